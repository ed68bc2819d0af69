//! The application-side checkpoint table, `regroup_applied`: one row per transaction a
//! partition applied, written in the same database transaction as the work itself.

use sea_orm_migration::prelude::*;

/// Creates `regroup_applied`. Add it to your application's migrator:
///
/// ```ignore
/// fn migrations() -> Vec<Box<dyn MigrationTrait>> {
///     vec![Box::new(m0001_my_tables::Migration), Box::new(regroup_migrations::AppliedMigration)]
/// }
/// ```
#[derive(Debug)]
pub struct AppliedMigration;

impl MigrationName for AppliedMigration {
    fn name(&self) -> &str {
        "m_regroup_applied_v1"
    }
}

/// Columns of `regroup_applied`.
#[derive(DeriveIden)]
pub enum Applied {
    /// The table.
    #[sea_orm(iden = "regroup_applied")]
    Table,
    /// The transaction's seq in its group's journal.
    Seq,
    /// The transaction's UUID.
    TxnId,
    /// The epoch it was delivered in.
    Epoch,
    /// The status the partition answered.
    Status,
    /// The body the partition answered.
    Body,
    /// The sender's floor when the record was delivered out of seq order (parallel replay
    /// of records declared independent): every record at or below it was recorded here
    /// already. Null for a record delivered in seq order. Added by
    /// [`AppliedFloorMigration`].
    Floor,
}

#[async_trait::async_trait]
impl MigrationTrait for AppliedMigration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_table(
                Table::create()
                    .table(Applied::Table)
                    .if_not_exists()
                    .col(
                        ColumnDef::new(Applied::Seq)
                            .big_integer()
                            .not_null()
                            .primary_key(),
                    )
                    .col(ColumnDef::new(Applied::TxnId).string().not_null())
                    .col(ColumnDef::new(Applied::Epoch).big_integer().not_null())
                    .col(ColumnDef::new(Applied::Status).integer().not_null())
                    .col(ColumnDef::new(Applied::Body).blob().not_null())
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .drop_table(Table::drop().table(Applied::Table).if_exists().to_owned())
            .await
    }
}

/// Adds `regroup_applied.floor`, which parallel replay (conflict keys) needs: without it the
/// partition's layer does not offer parallel replay and its records are replayed in seq
/// order. Add it after [`AppliedMigration`]:
///
/// ```ignore
/// vec![Box::new(regroup_migrations::AppliedMigration), Box::new(regroup_migrations::AppliedFloorMigration)]
/// ```
#[derive(Debug)]
pub struct AppliedFloorMigration;

impl MigrationName for AppliedFloorMigration {
    fn name(&self) -> &str {
        "m_regroup_applied_v2_floor"
    }
}

#[async_trait::async_trait]
impl MigrationTrait for AppliedFloorMigration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        if manager.has_column("regroup_applied", "floor").await? {
            return Ok(());
        }
        manager
            .alter_table(
                Table::alter()
                    .table(Applied::Table)
                    .add_column(ColumnDef::new(Applied::Floor).big_integer().null())
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .alter_table(
                Table::alter()
                    .table(Applied::Table)
                    .drop_column(Applied::Floor)
                    .to_owned(),
            )
            .await
    }
}
