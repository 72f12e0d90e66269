//! Stores shared by the instances of a cluster. Not specific to one feature: the
//! PostgreSQL pool and its numbered migrations serve the quarantine today
//! (`crate::quarantine::pg`) and can serve the decision log or DMARC report data by
//! adding their own migration files.

pub mod pg_tls;
pub mod postgres;
