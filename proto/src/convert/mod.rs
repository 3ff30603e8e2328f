//! Wire → domain conversions, one file per message family. The wire can lie (missing fields,
//! zero ids, oversize bodies); these `TryFrom`s are the only place that checks, so code past the
//! gRPC handler works with validated values.

pub mod events;
pub mod messaging;
pub mod registration;

#[cfg(test)]
mod tests;
