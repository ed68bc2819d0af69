//! sea-orm migrations for regroup's journal schema.
//!
//! [`JournalMigrator`] creates the tables the proxy's SQL journal needs; it keeps its own
//! bookkeeping table (`regroup_migrations`) so the journal can share a database with an
//! application without touching the application's `seaql_migrations`.

mod applied_schema;
mod executors;
mod journal_schema;
mod membership;
mod owner;
mod quarantine;

pub use applied_schema::{Applied, AppliedFloorMigration, AppliedMigration};
pub use journal_schema::{Checkpoint, Group, Record};
pub use owner::Owner;
use sea_orm_migration::prelude::*;

/// The migrator for the journal database (records, group epochs, replay checkpoints, the ownership lease).
#[derive(Debug)]
pub struct JournalMigrator;

#[async_trait::async_trait]
impl MigratorTrait for JournalMigrator {
    fn migrations() -> Vec<Box<dyn MigrationTrait>> {
        vec![
            Box::new(journal_schema::Migration),
            Box::new(quarantine::Migration),
            Box::new(executors::Migration),
            Box::new(owner::Migration),
            Box::new(membership::Migration),
        ]
    }

    fn migration_table_name() -> DynIden {
        "regroup_migrations".into_iden()
    }
}
