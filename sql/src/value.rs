//! Bound values between sea-orm and the journal: [`SqlValue`] keeps each value with the
//! type the application bound it with, so a replay binds exactly what the primary bound.

use regroup_replay::SqlValue;
use sea_orm::Value;

/// A value sea-orm binds, as the journal keeps it; `Err` names a type the journal cannot
/// keep yet (the statement is then refused, nothing journaled).
pub fn to_journal(v: &Value) -> Result<SqlValue, String> {
    Ok(match v {
        Value::Bool(x) => SqlValue::Bool(*x),
        Value::TinyInt(x) => SqlValue::TinyInt(*x),
        Value::SmallInt(x) => SqlValue::SmallInt(*x),
        Value::Int(x) => SqlValue::Int(*x),
        Value::BigInt(x) => SqlValue::BigInt(*x),
        Value::TinyUnsigned(x) => SqlValue::TinyUnsigned(*x),
        Value::SmallUnsigned(x) => SqlValue::SmallUnsigned(*x),
        Value::Unsigned(x) => SqlValue::Unsigned(*x),
        Value::BigUnsigned(x) => SqlValue::BigUnsigned(*x),
        Value::Float(x) => SqlValue::Float(x.map(|f| format!("{f:?}"))),
        Value::Double(x) => SqlValue::Double(x.map(|f| format!("{f:?}"))),
        Value::String(x) => SqlValue::String(x.clone()),
        Value::Char(x) => SqlValue::Char(*x),
        Value::Bytes(x) => SqlValue::Bytes(x.as_ref().map(hex::encode)),
        #[allow(unreachable_patterns)]
        other => {
            return Err(format!(
                "a bound value of type {other:?} cannot be journaled yet"
            ));
        }
    })
}

/// The value to bind on replay.
pub fn from_journal(v: &SqlValue) -> Result<Value, String> {
    Ok(match v {
        SqlValue::Bool(x) => Value::Bool(*x),
        SqlValue::TinyInt(x) => Value::TinyInt(*x),
        SqlValue::SmallInt(x) => Value::SmallInt(*x),
        SqlValue::Int(x) => Value::Int(*x),
        SqlValue::BigInt(x) => Value::BigInt(*x),
        SqlValue::TinyUnsigned(x) => Value::TinyUnsigned(*x),
        SqlValue::SmallUnsigned(x) => Value::SmallUnsigned(*x),
        SqlValue::Unsigned(x) => Value::Unsigned(*x),
        SqlValue::BigUnsigned(x) => Value::BigUnsigned(*x),
        SqlValue::Float(x) => Value::Float(
            x.as_deref()
                .map(|s| s.parse::<f32>().map_err(|e| format!("float {s:?}: {e}")))
                .transpose()?,
        ),
        SqlValue::Double(x) => Value::Double(
            x.as_deref()
                .map(|s| s.parse::<f64>().map_err(|e| format!("double {s:?}: {e}")))
                .transpose()?,
        ),
        SqlValue::String(x) => Value::String(x.clone()),
        SqlValue::Char(x) => Value::Char(*x),
        SqlValue::Bytes(x) => Value::Bytes(
            x.as_deref()
                .map(|s| hex::decode(s).map_err(|e| format!("bytes: {e}")))
                .transpose()?,
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_round_trip_exactly() {
        let values = [
            Value::Bool(Some(true)),
            Value::Int(None),
            Value::BigInt(Some(i64::MIN)),
            Value::BigUnsigned(Some(u64::MAX)),
            Value::Double(Some(0.1 + 0.2)),
            Value::Float(Some(f32::MIN_POSITIVE)),
            Value::String(Some("it's".into())),
            Value::String(None),
            Value::Bytes(Some(vec![0, 255, 7])),
            Value::Char(Some('é')),
        ];
        for v in values {
            let j = to_journal(&v).unwrap_or(SqlValue::Bool(None));
            let json = serde_json::to_string(&j).unwrap_or_default();
            let back: SqlValue = serde_json::from_str(&json).unwrap_or(SqlValue::Bool(None));
            assert_eq!(from_journal(&back).ok(), Some(v));
        }
    }
}
