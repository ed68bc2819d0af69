//! Fourth journal migration: the journal's ownership lease.

use sea_orm_migration::prelude::*;

/// Columns of `regroup_owner`: one row (id 1), the lease of the proxy that owns the journal.
#[derive(DeriveIden)]
pub enum Owner {
    /// The table.
    #[sea_orm(iden = "regroup_owner")]
    Table,
    /// Always 1: the table has one row.
    Id,
    /// The owning claim's id; NULL when nobody holds the lease (never claimed, or released).
    OwnerId,
    /// The owner as shown to an operator (host, pid, addresses).
    Describe,
    /// The fencing token: goes up by one with every claim; 0 before the first.
    Token,
    /// When the lease ends, in milliseconds since the Unix epoch by the database's clock.
    ExpiresAt,
}

/// Creates `regroup_owner` with its one row, unowned.
#[derive(Debug)]
pub(crate) struct Migration;

impl MigrationName for Migration {
    fn name(&self) -> &str {
        "m0004_owner"
    }
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_table(
                Table::create()
                    .table(Owner::Table)
                    .if_not_exists()
                    .col(
                        ColumnDef::new(Owner::Id)
                            .big_integer()
                            .not_null()
                            .primary_key(),
                    )
                    .col(ColumnDef::new(Owner::OwnerId).text().null())
                    .col(ColumnDef::new(Owner::Describe).text().not_null())
                    .col(ColumnDef::new(Owner::Token).big_integer().not_null())
                    .col(ColumnDef::new(Owner::ExpiresAt).big_integer().not_null())
                    .to_owned(),
            )
            .await?;
        let row = Query::insert()
            .into_table(Owner::Table)
            .columns([Owner::Id, Owner::Describe, Owner::Token, Owner::ExpiresAt])
            .values_panic([1i64.into(), "".into(), 0i64.into(), 0i64.into()])
            .to_owned();
        manager.exec_stmt(row).await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .drop_table(Table::drop().table(Owner::Table).to_owned())
            .await
    }
}
