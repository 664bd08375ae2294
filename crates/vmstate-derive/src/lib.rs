//! `#[derive(VmState)]`: a const schema and a matching codec from a plain struct.
//!
//! Struct attributes, `#[vmstate(...)]`:
//! - `name = "virtio-net"` (required): the description's name;
//! - `version = N` (default 1), `minimum_version = M` (default 1);
//! - `early_setup`: the state is sent during the setup phase;
//! - `validate = path`: `fn(&Self) -> Result<(), VmStateError>`, run after every load.
//!
//! Field attributes:
//! - `since = N`: absent in streams older than `N`, where it keeps its default;
//! - `default = expr`: that default (otherwise `Default::default()`);
//! - `max = N`: required on `Vec<T>` and `String`, the largest length accepted;
//! - `subsection` or `subsection = "name"`: on an `Option<T>` field (the only way an
//!   `Option` is encoded), sent when `Some` and `needed` holds;
//! - `needed = path`: `fn(&Self) -> bool`, further limits when a subsection is sent;
//! - `unused = N`: keeps `N` bytes of a removed field on the wire; the Rust field (any
//!   `Default` type, usually `()`) is not encoded;
//! - `skip`: not on the wire at all (runtime-only, takes its default on load);
//! - `rename = "wire_name"`: the name in the description.

use proc_macro::TokenStream;
use proc_macro2::TokenStream as Tokens;
use quote::{format_ident, quote};
use syn::{
    parse_macro_input, spanned::Spanned, Data, DeriveInput, Expr, Fields, GenericArgument, LitInt,
    LitStr, Path, PathArguments, Type,
};

#[proc_macro_derive(VmState, attributes(vmstate))]
pub fn derive_vmstate(input: TokenStream) -> TokenStream {
    let input = parse_macro_input!(input as DeriveInput);
    match expand(&input) {
        Ok(t) => t.into(),
        Err(e) => e.to_compile_error().into(),
    }
}

#[derive(Default)]
struct StructAttrs {
    name: Option<String>,
    version: u32,
    minimum_version: u32,
    early_setup: bool,
    validate: Option<Path>,
}

#[derive(Default)]
struct FieldAttrs {
    since: u32,
    default: Option<Expr>,
    max: Option<u32>,
    subsection: Option<Option<String>>,
    needed: Option<Path>,
    unused: Option<u32>,
    skip: bool,
    rename: Option<String>,
}

fn int<T: std::str::FromStr>(meta: &syn::meta::ParseNestedMeta) -> syn::Result<T>
where
    T::Err: std::fmt::Display,
{
    meta.value()?.parse::<LitInt>()?.base10_parse()
}

fn parse_struct_attrs(input: &DeriveInput) -> syn::Result<StructAttrs> {
    let mut a = StructAttrs {
        version: 1,
        minimum_version: 1,
        ..Default::default()
    };
    for attr in input.attrs.iter().filter(|a| a.path().is_ident("vmstate")) {
        attr.parse_nested_meta(|meta| {
            if meta.path.is_ident("name") {
                a.name = Some(meta.value()?.parse::<LitStr>()?.value());
            } else if meta.path.is_ident("version") {
                a.version = int(&meta)?;
            } else if meta.path.is_ident("minimum_version") {
                a.minimum_version = int(&meta)?;
            } else if meta.path.is_ident("early_setup") {
                a.early_setup = true;
            } else if meta.path.is_ident("validate") {
                a.validate = Some(meta.value()?.parse()?);
            } else {
                return Err(meta.error("unknown vmstate struct attribute"));
            }
            Ok(())
        })?;
    }
    if a.minimum_version > a.version || a.minimum_version == 0 {
        return Err(syn::Error::new(
            input.ident.span(),
            "vmstate: need 1 <= minimum_version <= version",
        ));
    }
    Ok(a)
}

fn parse_field_attrs(field: &syn::Field) -> syn::Result<FieldAttrs> {
    let mut a = FieldAttrs {
        since: 1,
        ..Default::default()
    };
    for attr in field.attrs.iter().filter(|a| a.path().is_ident("vmstate")) {
        attr.parse_nested_meta(|meta| {
            if meta.path.is_ident("since") {
                a.since = int(&meta)?;
            } else if meta.path.is_ident("default") {
                a.default = Some(meta.value()?.parse()?);
            } else if meta.path.is_ident("max") {
                a.max = Some(int(&meta)?);
            } else if meta.path.is_ident("subsection") {
                a.subsection = Some(if meta.input.peek(syn::Token![=]) {
                    Some(meta.value()?.parse::<LitStr>()?.value())
                } else {
                    None
                });
            } else if meta.path.is_ident("needed") {
                a.needed = Some(meta.value()?.parse()?);
            } else if meta.path.is_ident("unused") {
                a.unused = Some(int(&meta)?);
            } else if meta.path.is_ident("skip") {
                a.skip = true;
            } else if meta.path.is_ident("rename") {
                a.rename = Some(meta.value()?.parse::<LitStr>()?.value());
            } else {
                return Err(meta.error("unknown vmstate field attribute"));
            }
            Ok(())
        })?;
    }
    Ok(a)
}

/// `Vec<T>` -> `("Vec", T)`, `Option<T>` -> `("Option", T)`, `String` -> `("String", _)`.
fn container(ty: &Type) -> Option<(String, Option<&Type>)> {
    let Type::Path(tp) = ty else { return None };
    if tp.qself.is_some() {
        return None;
    }
    let seg = tp.path.segments.last()?;
    let name = seg.ident.to_string();
    let inner = match &seg.arguments {
        PathArguments::AngleBracketed(args) => args.args.iter().find_map(|a| match a {
            GenericArgument::Type(t) => Some(t),
            _ => None,
        }),
        _ => None,
    };
    match (name.as_str(), inner) {
        ("Vec" | "Option", Some(_)) | ("String", None) => Some((name, inner)),
        _ => None,
    }
}

fn expand(input: &DeriveInput) -> syn::Result<Tokens> {
    let sa = parse_struct_attrs(input)?;
    let ident = &input.ident;
    if !input.generics.params.is_empty() {
        return Err(syn::Error::new(
            input.generics.span(),
            "vmstate: generic state structs are not supported",
        ));
    }
    let Data::Struct(data) = &input.data else {
        return Err(syn::Error::new(ident.span(), "vmstate: only structs"));
    };
    let Fields::Named(fields) = &data.fields else {
        return Err(syn::Error::new(ident.span(), "vmstate: only named fields"));
    };
    let Some(vmsd_name) = sa.name.clone() else {
        return Err(syn::Error::new(
            ident.span(),
            "vmstate: missing #[vmstate(name = \"...\")]",
        ));
    };
    let vs = quote!(::baton_vmstate);
    let version = sa.version;
    let min_version = sa.minimum_version;
    let early = sa.early_setup;

    let mut descs = Vec::new();
    let mut subs = Vec::new();
    let mut saves = Vec::new();
    let mut sub_saves = Vec::new();
    let mut loads = Vec::new();
    let mut sub_arms = Vec::new();
    let mut inits = Vec::new();

    for field in &fields.named {
        let fa = parse_field_attrs(field)?;
        let fid = field.ident.as_ref().expect("named field");
        let wire = fa.rename.clone().unwrap_or_else(|| fid.to_string());
        let ty = &field.ty;
        let since = fa.since;
        if since > version || since == 0 {
            return Err(syn::Error::new(
                field.span(),
                "vmstate: need 1 <= since <= struct version",
            ));
        }
        let default = match &fa.default {
            Some(e) => quote!(#e),
            None => quote!(::core::default::Default::default()),
        };
        let local = format_ident!("__f_{}", fid);
        inits.push(quote!(#fid: #local));

        if fa.skip {
            loads.push(quote!(let #local: #ty = #default;));
            continue;
        }
        if let Some(size) = fa.unused {
            descs.push(quote!(#vs::Field {
                name: ::std::borrow::Cow::Borrowed(#wire),
                kind: #vs::FieldKind::Unused { size: #size },
                since: #since,
            }));
            saves.push(quote!(#vs::encode_unused(#size as usize, out);));
            loads.push(quote! {
                if version_id >= #since {
                    r.bytes(#size as usize).map_err(|e| e.in_field(#wire))?;
                }
                let #local: #ty = #default;
            });
            continue;
        }
        let cont = container(ty);
        if let Some(sub_name) = &fa.subsection {
            let Some(("Option", Some(inner))) = cont.as_ref().map(|(n, t)| (n.as_str(), *t)) else {
                return Err(syn::Error::new(
                    ty.span(),
                    "vmstate: a subsection field must be Option<T> with T: VmState",
                ));
            };
            let sname = sub_name.clone().unwrap_or_else(|| wire.clone());
            if sname.len() > 255 {
                return Err(syn::Error::new(
                    field.span(),
                    "vmstate: subsection name too long",
                ));
            }
            let (needed_text, needed_check) = match &fa.needed {
                Some(p) => (
                    format!("present and {}", quote!(#p).to_string().replace(' ', "")),
                    quote!(#p(self)),
                ),
                None => ("present".to_owned(), quote!(true)),
            };
            subs.push(quote!(#vs::Subsection {
                name: ::std::borrow::Cow::Borrowed(#sname),
                needed: ::std::borrow::Cow::Borrowed(#needed_text),
                vmsd: #vs::SchemaRef::Static(&<#inner as #vs::VmState>::VMSD),
            }));
            sub_saves.push(quote! {
                if let ::core::option::Option::Some(v) = &self.#fid {
                    if #needed_check {
                        #vs::encode_subsection(
                            #sname,
                            <#inner as #vs::VmState>::VMSD.version_id,
                            out,
                            |out| #vs::VmState::save_into(v, out),
                        );
                    }
                }
            });
            loads.push(quote!(let mut #local: #ty = ::core::option::Option::None;));
            sub_arms.push(quote! {
                #sname => {
                    if #local.is_some() {
                        return Err(#vs::duplicate_subsection(#sname, &body));
                    }
                    let v = (|| {
                        #vs::check_version(&<#inner as #vs::VmState>::VMSD, sub_version)?;
                        let v = <#inner as #vs::VmState>::load_from(&mut body, sub_version)?;
                        #vs::finish_subsection(&body)?;
                        Ok::<_, #vs::VmStateError>(v)
                    })()
                    .map_err(|e| e.in_subsection(#sname))?;
                    #local = ::core::option::Option::Some(v);
                }
            });
            continue;
        }
        let (kind, save, decode) = match cont.as_ref().map(|(n, t)| (n.as_str(), *t)) {
            Some(("Vec", Some(elem))) => {
                let Some(max) = fa.max else {
                    return Err(syn::Error::new(ty.span(), "vmstate: Vec needs max = N"));
                };
                (
                    quote!(#vs::FieldKind::Vec {
                        max_len: #max,
                        elem: #vs::SchemaRef::Static(&<#elem as #vs::VmStateField>::KIND),
                    }),
                    quote!(#vs::encode_vec::<#elem>(&self.#fid, out);),
                    quote!(#vs::decode_vec::<#elem>(r, #max)),
                )
            }
            Some(("String", None)) => {
                let Some(max) = fa.max else {
                    return Err(syn::Error::new(ty.span(), "vmstate: String needs max = N"));
                };
                (
                    quote!(#vs::FieldKind::String { max_len: #max }),
                    quote!(#vs::encode_string(&self.#fid, out);),
                    quote!(#vs::decode_string(r, #max)),
                )
            }
            Some(("Option", _)) => {
                return Err(syn::Error::new(
                    ty.span(),
                    "vmstate: Option<T> fields must be #[vmstate(subsection)]",
                ))
            }
            _ => (
                quote!(<#ty as #vs::VmStateField>::KIND),
                quote!(#vs::VmStateField::encode(&self.#fid, out);),
                quote!(<#ty as #vs::VmStateField>::decode(r)),
            ),
        };
        descs.push(quote!(#vs::Field {
            name: ::std::borrow::Cow::Borrowed(#wire),
            kind: #kind,
            since: #since,
        }));
        saves.push(save);
        loads.push(quote! {
            let #local: #ty = if version_id >= #since {
                #decode.map_err(|e| e.in_field(#wire))?
            } else {
                #default
            };
        });
    }

    let validate = match &sa.validate {
        Some(p) => quote!(#p(&s)?;),
        None => quote!(),
    };

    Ok(quote! {
        impl #vs::VmState for #ident {
            const VMSD: #vs::VmStateDescription = #vs::VmStateDescription {
                name: ::std::borrow::Cow::Borrowed(#vmsd_name),
                version_id: #version,
                minimum_version_id: #min_version,
                early_setup: #early,
                fields: ::std::borrow::Cow::Borrowed(&[#(#descs),*]),
                subsections: ::std::borrow::Cow::Borrowed(&[#(#subs),*]),
            };

            fn vmsd() -> &'static #vs::VmStateDescription {
                static VMSD: #vs::VmStateDescription = <#ident as #vs::VmState>::VMSD;
                &VMSD
            }

            fn save_into(&self, out: &mut ::std::vec::Vec<u8>) {
                #(#saves)*
                #(#sub_saves)*
                out.push(#vs::END_MARKER);
            }

            #[allow(unused_variables, unused_mut, non_snake_case)]
            fn load_from(
                r: &mut #vs::Reader<'_>,
                version_id: u32,
            ) -> ::core::result::Result<Self, #vs::VmStateError> {
                #(#loads)*
                while let ::core::option::Option::Some((name, sub_version, mut body)) =
                    r.subsection()?
                {
                    match name {
                        #(#sub_arms)*
                        other => {
                            return Err(#vs::unknown_subsection(other, &body))
                        }
                    }
                }
                let s = #ident { #(#inits),* };
                #validate
                Ok(s)
            }
        }

        impl #vs::VmStateField for #ident {
            const KIND: #vs::FieldKind = #vs::FieldKind::Struct {
                vmsd: #vs::SchemaRef::Static(&<#ident as #vs::VmState>::VMSD),
            };
            fn encode(&self, out: &mut ::std::vec::Vec<u8>) {
                out.extend_from_slice(
                    &<#ident as #vs::VmState>::VMSD.version_id.to_le_bytes(),
                );
                #vs::VmState::save_into(self, out);
            }
            fn decode(
                r: &mut #vs::Reader<'_>,
            ) -> ::core::result::Result<Self, #vs::VmStateError> {
                let v = r.version(&<#ident as #vs::VmState>::VMSD)?;
                <#ident as #vs::VmState>::load_from(r, v)
            }
        }
    })
}
