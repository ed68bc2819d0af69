//! Fifth journal migration: a group's membership, kept in the journal.

use sea_orm_migration::prelude::*;

use crate::journal_schema::Group;

/// Adds `regroup_group.members` (a JSON array of the group's partitions: name, url, host,
/// priority; NULL until stored) and `regroup_group.members_version` (0 until stored, then up
/// by one with every change: the compare-and-set token).
#[derive(Debug)]
pub(crate) struct Migration;

impl MigrationName for Migration {
    fn name(&self) -> &str {
        "m0005_membership"
    }
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        // One column per statement: SQLite adds one column at a time.
        manager
            .alter_table(
                Table::alter()
                    .table(Group::Table)
                    .add_column(ColumnDef::new(Group::Members).text().null())
                    .to_owned(),
            )
            .await?;
        manager
            .alter_table(
                Table::alter()
                    .table(Group::Table)
                    .add_column(
                        ColumnDef::new(Group::MembersVersion)
                            .big_integer()
                            .not_null()
                            .default(0),
                    )
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        for column in [Group::Members, Group::MembersVersion] {
            manager
                .alter_table(
                    Table::alter()
                        .table(Group::Table)
                        .drop_column(column)
                        .to_owned(),
                )
                .await?;
        }
        Ok(())
    }
}
