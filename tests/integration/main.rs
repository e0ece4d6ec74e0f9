//! The integration tests: the real client, sync and binary against the real simulator over
//! loopback and real SQLite files. One binary, so it builds and links once.

mod analysts;
mod api_routes;
mod cli;
mod content;
mod daemon;
mod daemon_loop;
mod harsh;
mod install;
mod organizations;
mod packaging;
mod plan;
mod postgres_ops;
mod postgres_outage;
mod replication;
mod robustness;
mod store_errors;
mod support;
mod sync_quiet;
mod tidy;
mod warehouse;
