//! Second journal migration: a diverged partition stays quarantined across proxy restarts.

use sea_orm_migration::prelude::*;

use crate::journal_schema::Checkpoint;

/// Adds `regroup_checkpoint.diverged`.
#[derive(Debug)]
pub(crate) struct Migration;

impl MigrationName for Migration {
    fn name(&self) -> &str {
        "m0002_quarantine"
    }
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .alter_table(
                Table::alter()
                    .table(Checkpoint::Table)
                    .add_column(ColumnDef::new(Checkpoint::Diverged).text().null())
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .alter_table(
                Table::alter()
                    .table(Checkpoint::Table)
                    .drop_column(Checkpoint::Diverged)
                    .to_owned(),
            )
            .await
    }
}
