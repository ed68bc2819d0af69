//! Third journal migration: who may have executed a record that is not sealed.

use sea_orm_migration::prelude::*;

use crate::journal_schema::Record;

/// Adds `regroup_record.executors`: a JSON array of the partitions a record was sent to
/// for execution (the primary it was appended for, then every new primary it was restamped
/// for), so a record found in doubt after a restart knows who may have executed it.
#[derive(Debug)]
pub(crate) struct Migration;

impl MigrationName for Migration {
    fn name(&self) -> &str {
        "m0003_executors"
    }
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .alter_table(
                Table::alter()
                    .table(Record::Table)
                    .add_column(
                        ColumnDef::new(Record::Executors)
                            .text()
                            .not_null()
                            .default("[]"),
                    )
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .alter_table(
                Table::alter()
                    .table(Record::Table)
                    .drop_column(Record::Executors)
                    .to_owned(),
            )
            .await
    }
}
