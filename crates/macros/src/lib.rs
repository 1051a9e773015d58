//! `#[task]`: turns a plain Rust function into a registered dask-rs task.
//!
//! ```ignore
//! #[dask::task]
//! fn inc(x: i64) -> i64 { x + 1 }
//! ```
//! expands to a unit struct `inc` (so `client.submit(inc, (1,))` type-checks the arguments
//! against `(i64,)` and returns a `Future<i64>`), an inherent `inc::call(x)` that runs the
//! function in-process, a `Task` impl, and an `inventory` registration so every binary that
//! links the crate can run it by name.
//!
//! A function that returns `Result<T, E>` (with `E: Display`) produces `T`; an `Err` becomes a
//! task error carrying `E`'s message. Options: `#[task(name = "other-name")]` changes the
//! registered name (the default is the function's name); `#[task(crate = path)]` names the crate
//! that re-exports `__private` (default `::dask`).
use proc_macro::TokenStream;
use proc_macro2::Span;
use quote::{format_ident, quote};
use syn::{
    Expr, ExprLit, FnArg, GenericArgument, ItemFn, Lit, Meta, Path, PathArguments, ReturnType, Token, Type,
    parse::Parser, parse_macro_input, punctuated::Punctuated, spanned::Spanned,
};

#[proc_macro_attribute]
pub fn task(attr: TokenStream, item: TokenStream) -> TokenStream {
    let func = parse_macro_input!(item as ItemFn);
    let metas = match Punctuated::<Meta, Token![,]>::parse_terminated.parse(attr) {
        Ok(m) => m,
        Err(e) => return e.to_compile_error().into(),
    };
    match expand(metas, func) {
        Ok(ts) => ts.into(),
        Err(e) => e.to_compile_error().into(),
    }
}

fn expand(metas: Punctuated<Meta, Token![,]>, func: ItemFn) -> syn::Result<proc_macro2::TokenStream> {
    let mut krate: Path = syn::parse_quote!(::dask);
    let mut name: Option<String> = None;
    for meta in metas {
        match &meta {
            Meta::NameValue(nv) if nv.path.is_ident("crate") => {
                krate = match &nv.value {
                    Expr::Path(p) => p.path.clone(),
                    Expr::Lit(ExprLit { lit: Lit::Str(s), .. }) => s.parse()?,
                    other => return Err(syn::Error::new(other.span(), "expected a path")),
                };
            }
            Meta::NameValue(nv) if nv.path.is_ident("name") => match &nv.value {
                Expr::Lit(ExprLit { lit: Lit::Str(s), .. }) => name = Some(s.value()),
                other => return Err(syn::Error::new(other.span(), "expected a string")),
            },
            other => {
                return Err(syn::Error::new(
                    other.span(),
                    "unknown option: expected `name = \"...\"` or `crate = path`",
                ));
            }
        }
    }
    let sig = &func.sig;
    if let Some(a) = &sig.asyncness {
        return Err(syn::Error::new(a.span(), "a task function must not be async"));
    }
    if !sig.generics.params.is_empty() {
        return Err(syn::Error::new(
            sig.generics.span(),
            "a task function must not be generic: register one function per concrete type",
        ));
    }
    let ident = &sig.ident;
    let vis = &func.vis;
    let name = name.unwrap_or_else(|| ident.to_string());
    let mut arg_types = Vec::new();
    let mut arg_names = Vec::new();
    for (i, input) in sig.inputs.iter().enumerate() {
        match input {
            FnArg::Receiver(r) => {
                return Err(syn::Error::new(r.span(), "a task function cannot take self"));
            }
            FnArg::Typed(pt) => {
                if let Type::Reference(r) = &*pt.ty {
                    return Err(syn::Error::new(
                        r.span(),
                        "task arguments must be owned values (they are deserialized)",
                    ));
                }
                arg_types.push((*pt.ty).clone());
                arg_names.push(format_ident!("__dask_arg{}", i));
            }
        }
    }
    let (output, body_call) = match &sig.output {
        ReturnType::Default => (quote!(()), quote!(Ok(#ident::call(#(#arg_names),*)))),
        ReturnType::Type(_, ty) => match result_ok_type(ty) {
            Some(ok) => (
                quote!(#ok),
                quote!(#ident::call(#(#arg_names),*).map_err(|e| #krate::__private::ToString::to_string(&e))),
            ),
            None => (quote!(#ty), quote!(Ok(#ident::call(#(#arg_names),*)))),
        },
    };
    let attrs = &func.attrs;
    let block = &func.block;
    let inputs = &sig.inputs;
    let ret = &sig.output;
    let doc = format!(
        "The `{name}` task. Submit it with `client.submit({ident}, (args...))`; run it in-process with `{ident}::call(...)`."
    );
    let call_span = Span::call_site();
    let tuple_ty = quote_spanned_tuple(&arg_types, call_span);
    Ok(quote! {
        #[doc = #doc]
        #[allow(non_camel_case_types)]
        #[derive(Clone, Copy, Debug, Default)]
        #vis struct #ident;

        impl #ident {
            /// Runs the function directly in this process.
            #(#attrs)*
            #vis fn call(#inputs) #ret #block
        }

        impl #krate::__private::Task for #ident {
            const NAME: &'static str = #name;
            type Args = #tuple_ty;
            type Output = #output;
            fn run(args: Self::Args) -> ::core::result::Result<Self::Output, #krate::__private::String> {
                let (#(#arg_names,)*) = args;
                #body_call
            }
        }

        #krate::__private::inventory::submit! {
            #krate::__private::Registration::new::<#ident>()
        }
    })
}

fn quote_spanned_tuple(types: &[Type], _span: Span) -> proc_macro2::TokenStream {
    quote!((#(#types,)*))
}

/// `Result<T, E>` (any path ending in `Result` with two arguments) -> `T`.
fn result_ok_type(ty: &Type) -> Option<Type> {
    let Type::Path(tp) = ty else { return None };
    let last = tp.path.segments.last()?;
    if last.ident != "Result" {
        return None;
    }
    let PathArguments::AngleBracketed(args) = &last.arguments else {
        return None;
    };
    let mut types = args.args.iter().filter_map(|a| match a {
        GenericArgument::Type(t) => Some(t.clone()),
        _ => None,
    });
    let ok = types.next()?;
    types.next()?;
    Some(ok)
}
