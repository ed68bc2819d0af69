//! The first journal schema: records, groups and replay checkpoints.

use sea_orm_migration::prelude::*;

/// Creates `regroup_group`, `regroup_record` and `regroup_checkpoint`.
#[derive(DeriveMigrationName)]
pub(crate) struct Migration;

/// Columns of `regroup_group`: one row per redundancy group.
#[derive(DeriveIden)]
pub enum Group {
    /// The table.
    #[sea_orm(iden = "regroup_group")]
    Table,
    /// The group's name.
    Name,
    /// The primary's term; goes up by one on every change of primary.
    Epoch,
    /// The name of the partition that holds the primary role.
    PrimaryName,
    /// The group's partitions as JSON (m0005; NULL until stored).
    Members,
    /// The membership's version (m0005; 0 until stored).
    MembersVersion,
}

/// Columns of `regroup_record`: one row per transaction, keyed by (group, seq).
#[derive(DeriveIden)]
pub enum Record {
    /// The table.
    #[sea_orm(iden = "regroup_record")]
    Table,
    /// The group the record belongs to.
    GroupName,
    /// Dense position in the group's journal, from 1.
    Seq,
    /// The transaction's UUID (v7), as text.
    TxnId,
    /// The epoch it was executed in.
    Epoch,
    /// The time fixed at the primary, RFC 3339 UTC.
    Timestamp,
    /// The HTTP method.
    Method,
    /// Path and query.
    Uri,
    /// The headers worth replaying, as a JSON array of `[name, value]` pairs.
    Headers,
    /// The request body.
    Body,
    /// `pending`, `executed`, `skipped` or `in_doubt`.
    State,
    /// The primary's response status, once executed.
    Status,
    /// Hex SHA-256 of the primary's response body, once executed.
    BodyHash,
    /// The partitions that may have executed it, as a JSON array (added by the
    /// `executors` migration).
    Executors,
}

/// Columns of `regroup_checkpoint`: how far each partition has applied its group's journal.
#[derive(DeriveIden)]
pub enum Checkpoint {
    /// The table.
    #[sea_orm(iden = "regroup_checkpoint")]
    Table,
    /// The group.
    GroupName,
    /// The partition.
    Partition,
    /// The highest seq the partition applied (0 for none).
    Applied,
    /// Why the partition was found diverged, until an operator rejoins it (added by the
    /// `quarantine` migration).
    Diverged,
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_table(
                Table::create()
                    .table(Group::Table)
                    .if_not_exists()
                    .col(
                        ColumnDef::new(Group::Name)
                            .string()
                            .not_null()
                            .primary_key(),
                    )
                    .col(ColumnDef::new(Group::Epoch).big_integer().not_null())
                    .col(ColumnDef::new(Group::PrimaryName).string().null())
                    .to_owned(),
            )
            .await?;
        manager
            .create_table(
                Table::create()
                    .table(Record::Table)
                    .if_not_exists()
                    .col(ColumnDef::new(Record::GroupName).string().not_null())
                    .col(ColumnDef::new(Record::Seq).big_integer().not_null())
                    .col(ColumnDef::new(Record::TxnId).string().not_null())
                    .col(ColumnDef::new(Record::Epoch).big_integer().not_null())
                    .col(ColumnDef::new(Record::Timestamp).string().not_null())
                    .col(ColumnDef::new(Record::Method).string().not_null())
                    .col(ColumnDef::new(Record::Uri).text().not_null())
                    .col(ColumnDef::new(Record::Headers).text().not_null())
                    .col(ColumnDef::new(Record::Body).blob().not_null())
                    .col(ColumnDef::new(Record::State).string().not_null())
                    .col(ColumnDef::new(Record::Status).integer().null())
                    .col(ColumnDef::new(Record::BodyHash).string().null())
                    .primary_key(Index::create().col(Record::GroupName).col(Record::Seq))
                    .to_owned(),
            )
            .await?;
        manager
            .create_table(
                Table::create()
                    .table(Checkpoint::Table)
                    .if_not_exists()
                    .col(ColumnDef::new(Checkpoint::GroupName).string().not_null())
                    .col(ColumnDef::new(Checkpoint::Partition).string().not_null())
                    .col(ColumnDef::new(Checkpoint::Applied).big_integer().not_null())
                    .primary_key(
                        Index::create()
                            .col(Checkpoint::GroupName)
                            .col(Checkpoint::Partition),
                    )
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        for table in [
            Checkpoint::Table.into_iden(),
            Record::Table.into_iden(),
            Group::Table.into_iden(),
        ] {
            manager
                .drop_table(Table::drop().table(table).if_exists().to_owned())
                .await?;
        }
        Ok(())
    }
}
