//! The one rule for option structs: `options!` wraps a struct definition, marks it
//! `#[non_exhaustive]` (fields can be added without breaking callers) and gives it a chainable
//! setter per field, named like the field and documented with the field's own docs, so
//! callers outside the crate build options as `MergeOptions::default().verify(true)` instead
//! of a struct literal (fields stay public: reading them and `o.field = x` still work).
//!
//! A field may name its setter (`pub clone: bool => cloning,`) where the field's name would
//! shadow a trait method (`Clone::clone`).

/// Defines an option struct with `#[non_exhaustive]` and a setter per field (see the module).
macro_rules! options {
    (@setter [$(#[$meta:meta])*] $field:ident $ty:ty) => {
        options!(@setter [$(#[$meta])*] $field $ty => $field);
    };
    (@setter [$(#[$meta:meta])*] $field:ident $ty:ty => $setter:ident) => {
        #[doc = concat!("Sets `", stringify!($field), "` (chainable):")]
        #[doc = ""]
        $(#[$meta])*
        #[must_use]
        pub fn $setter(mut self, $field: $ty) -> Self {
            self.$field = $field;
            self
        }
    };
    (
        $(#[$struct_meta:meta])*
        $vis:vis struct $name:ident $(<$lt:lifetime>)? {
            $(
                $(#[$field_meta:meta])*
                $field_vis:vis $field:ident : $ty:ty $(=> $setter:ident)?
            ),* $(,)?
        }
    ) => {
        $(#[$struct_meta])*
        #[non_exhaustive]
        $vis struct $name $(<$lt>)? {
            $(
                $(#[$field_meta])*
                $field_vis $field: $ty,
            )*
        }

        impl $(<$lt>)? $name $(<$lt>)? {
            $(
                options!(@setter [$(#[$field_meta])*] $field $ty $(=> $setter)?);
            )*
        }
    };
}
