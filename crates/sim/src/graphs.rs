//! Graph shapes of the RSDS and Estee benchmarks, with seeded durations and sizes.
use std::sync::Arc;

use crate::Rng;

/// One task of a simulated graph.
#[derive(Clone, Debug)]
pub struct SimTask {
    pub key: Arc<str>,
    /// Indices of earlier tasks.
    pub deps: Vec<usize>,
    /// Seconds it runs on a worker of speed 1.
    pub duration: f64,
    /// Bytes of its result.
    pub nbytes: u64,
}

/// A graph, in topological order; the tasks nobody depends on are its outputs.
#[derive(Clone, Debug, Default)]
pub struct Graph {
    pub name: String,
    pub tasks: Vec<SimTask>,
}

impl Graph {
    fn push(&mut self, prefix: &str, deps: Vec<usize>, duration: f64, nbytes: u64) -> usize {
        let i = self.tasks.len();
        self.tasks.push(SimTask { key: Arc::from(format!("{prefix}-{i}")), deps, duration, nbytes });
        i
    }

    /// Tasks no other task depends on.
    pub fn outputs(&self) -> Vec<usize> {
        let mut used = vec![false; self.tasks.len()];
        for t in &self.tasks {
            for &d in &t.deps {
                used[d] = true;
            }
        }
        (0..self.tasks.len()).filter(|i| !used[*i]).collect()
    }

    /// Total seconds of work at speed 1.
    pub fn total_work(&self) -> f64 {
        self.tasks.iter().map(|t| t.duration).sum()
    }

    /// The longest chain of durations (transfers not counted).
    pub fn critical_path(&self) -> f64 {
        let mut finish = vec![0.0f64; self.tasks.len()];
        for (i, t) in self.tasks.iter().enumerate() {
            let start = t.deps.iter().map(|d| finish[*d]).fold(0.0, f64::max);
            finish[i] = start + t.duration;
        }
        finish.into_iter().fold(0.0, f64::max)
    }
}

/// How the durations of a graph's main tasks are drawn (milliseconds).
#[derive(Clone, Copy, Debug)]
pub enum Dist {
    /// Uniform between half and one and a half times this.
    Jitter(f64),
    /// Log-normal around this median (sigma 1), capped at 40 times it: a few tasks take far
    /// longer than the rest.
    Heavy(f64),
}

impl Dist {
    fn draw(self, rng: &mut Rng) -> f64 {
        match self {
            Dist::Jitter(ms) => ms / 1e3 * (0.5 + rng.unit()),
            Dist::Heavy(ms) => heavy(rng, ms / 1e3),
        }
    }

    fn name(self) -> String {
        match self {
            Dist::Jitter(ms) => format!("{ms} ms"),
            Dist::Heavy(ms) => format!("~{ms} ms heavy-tailed"),
        }
    }
}

/// A heavy-tailed duration: log-normal around `median` seconds (sigma 1), capped at 40×.
fn heavy(rng: &mut Rng, median: f64) -> f64 {
    // Box-Muller from two uniforms.
    let (u1, u2) = (rng.unit().max(1e-12), rng.unit());
    let z = (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos();
    (median * z.exp()).min(40.0 * median)
}

/// RSDS `merge`: `n` independent tasks, then one task using all.
pub fn merge(n: usize, dist: Dist, seed: u64) -> Graph {
    let mut rng = Rng(seed);
    let mut g = Graph { name: format!("merge-{n} ({})", dist.name()), ..Graph::default() };
    let leaves: Vec<usize> = (0..n).map(|_| g.push("leaf", vec![], dist.draw(&mut rng), 1_000)).collect();
    g.push("merge", leaves, 0.001, 8);
    g
}

/// A tree reduction of `n` leaves with fan-in `fan`, each reduction 1 ms; values of 100 kB.
/// Submitted level by level (every leaf first), as a user building it would.
pub fn tree(n: usize, fan: usize, dist: Dist, seed: u64) -> Graph {
    tree_of(n, fan, dist, 100_000, seed)
}

/// [`tree`] with values of `nbytes`.
pub fn tree_of(n: usize, fan: usize, dist: Dist, nbytes: u64, seed: u64) -> Graph {
    tree_built(n, fan, dist, nbytes, seed, false)
}

/// [`tree_of`] whose leaves are grouped at random (siblings are not next to each other in the
/// order the leaves were submitted, as in a reduction over a shuffled or strided collection).
pub fn tree_scattered(n: usize, fan: usize, dist: Dist, nbytes: u64, seed: u64) -> Graph {
    tree_built(n, fan, dist, nbytes, seed, true)
}

fn tree_built(n: usize, fan: usize, dist: Dist, nbytes: u64, seed: u64, scatter: bool) -> Graph {
    let mut rng = Rng(seed);
    let mut g = Graph { name: format!("tree-{n}x{fan} ({})", dist.name()), ..Graph::default() };
    let mut level: Vec<usize> = (0..n).map(|_| g.push("leaf", vec![], dist.draw(&mut rng), nbytes)).collect();
    if scatter {
        for i in (1..level.len()).rev() {
            let j = rng.below(i + 1);
            level.swap(i, j);
        }
        g.name = format!("tree-{n}x{fan}, leaves grouped at random ({})", dist.name());
    }
    while level.len() > 1 {
        level = level.chunks(fan.max(2)).map(|c| g.push("reduce", c.to_vec(), 0.001, nbytes)).collect();
    }
    g
}

/// RSDS `shuffle`: `n` inputs of `nbytes` each split into `n` parts; `n` outputs each take one
/// part of every input (n² edges: transfers dominate).
pub fn shuffle(n: usize, nbytes: u64, seed: u64) -> Graph {
    let mut rng = Rng(seed);
    let mut g = Graph { name: format!("shuffle-{n}"), ..Graph::default() };
    let inputs: Vec<usize> = (0..n).map(|_| g.push("load", vec![], heavy(&mut rng, 0.02), nbytes)).collect();
    let part = (nbytes / n as u64).max(1);
    let splits: Vec<usize> = inputs.iter().map(|i| g.push("split", vec![*i], 0.005, part * n as u64)).collect();
    for _ in 0..n {
        g.push("combine", splits.clone(), 0.01, part * n as u64);
    }
    g
}

/// Cross-validation-like fan-out/fan-in: one data set, `params` × `folds` fits, a score per
/// fit, a best-of per parameter set, and one final choice.
pub fn crossv(params: usize, folds: usize, dist: Dist, seed: u64) -> Graph {
    let mut rng = Rng(seed);
    let mut g = Graph { name: format!("crossv-{params}x{folds} ({})", dist.name()), ..Graph::default() };
    let data = g.push("data", vec![], 0.05, 10_000_000);
    let splits: Vec<usize> = (0..folds).map(|_| g.push("split", vec![data], 0.01, 2_000_000)).collect();
    let mut bests = Vec::new();
    for _ in 0..params {
        let scores: Vec<usize> = splits
            .iter()
            .map(|s| {
                let fit = g.push("fit", vec![*s], dist.draw(&mut rng), 100_000);
                g.push("score", vec![fit, *s], 0.002, 8)
            })
            .collect();
        bests.push(g.push("best", scores, 0.001, 8));
    }
    g.push("choose", bests, 0.001, 8);
    g
}

/// Independent tasks of one kind whose durations change mid-run: the first `short` take 1 ms
/// (so the scheduler measures the kind as short and queues it ten deep per thread), the next
/// `long` are heavy-tailed around `long_ms`.
pub fn changing(short: usize, long: usize, long_ms: f64, seed: u64) -> Graph {
    let mut rng = Rng(seed);
    let mut g = Graph { name: format!("changing-{short}+{long}"), ..Graph::default() };
    for _ in 0..short {
        g.push("work", vec![], 0.001, 8);
    }
    for _ in 0..long {
        g.push("work", vec![], heavy(&mut rng, long_ms / 1e3), 8);
    }
    g
}

/// `n` independent tasks of `ms` each.
pub fn flat(n: usize, ms: f64) -> Graph {
    let mut g = Graph { name: format!("flat-{n}"), ..Graph::default() };
    for _ in 0..n {
        g.push("work", vec![], ms / 1e3, 8);
    }
    g
}
