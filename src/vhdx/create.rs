//! Creating VHDX files.
