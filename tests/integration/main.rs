//! The integration tests: the real client, sync and binary against the real simulator over
//! loopback and real SQLite files, and real PostgreSQL databases of a throwaway cluster where
//! one can run (support.rs's `both_backends!`). One binary, so it builds and links once.

mod analysts;
mod api_routes;
mod cli;
mod content;
mod copy;
mod daemon;
mod daemon_loop;
mod harsh;
mod install;
mod organizations;
mod packaging;
mod plan;
mod postgres;
mod postgres_ops;
mod postgres_outage;
mod replication;
mod robustness;
mod store_errors;
mod support;
mod sync_quiet;
mod tidy;
mod warehouse;
mod webhook;
