//! blockrep's framed, authenticated TCP protocol.
#![deny(missing_docs)]
