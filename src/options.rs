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

#[cfg(test)]
mod tests {
    use crate::flatten::{FlattenFormat, FlattenOptions};
    use crate::layer::OpenOptions;
    use crate::merge::MergeOptions;

    /// A setter changes its field only: the others keep the base's values.
    #[test]
    fn setters_set_one_field_each() {
        let base = MergeOptions::default();
        let o = MergeOptions::default()
            .verify(!base.verify)
            .set_clone(!base.clone)
            .batch_bytes(7);
        assert_eq!(
            (o.verify, o.clone, o.batch_bytes),
            (!base.verify, !base.clone, 7)
        );
        assert_eq!(
            (o.dry_run, o.force, o.relink.len()),
            (base.dry_run, base.force, 0)
        );

        let mut calls = 0;
        let mut progress = |_: &crate::flatten::FlattenProgress| calls += 1;
        let f = FlattenOptions::default()
            .layer(2)
            .progress(Some(&mut progress));
        assert_eq!(
            (f.layer, f.format, f.progress.is_some()),
            (2, FlattenFormat::default(), true)
        );

        let w = OpenOptions::read_only().set_writable(true).lenient(true);
        assert!(w.writable && w.lenient);
        assert!(!OpenOptions::writable().set_writable(false).writable);
    }
}
