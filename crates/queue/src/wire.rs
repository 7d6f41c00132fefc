//! The one encoding of what Rust sends to the Lua scripts and what they send back.
//!
//! A script call carries, after the prelude's arguments (prefix, retention, events length),
//! a **header** record and a list of **item** records. Each is sent as its field count, its
//! field names, then its values (one record for the header, any number of items), so a
//! script reads named fields: the prelude's `read_records` builds `A` (the header) and
//! `ITEMS`, tables whose unknown fields raise an error instead of reading as `nil`.
//! Records are Rust structs declared with [`record!`]: the field names sent are the struct's,
//! in one place.
//!
//! Values: text as is, numbers in decimal, flags as `1`/`0`, absent options as the empty
//! string.
//!
//! Replies of more than a few values come back as rows: the prelude's `reply_rows(names,
//! rows)` sends the field count, the names, then the values of each row; [`Rows`] reads them
//! by name.

use std::collections::HashMap;

use redis::{Cmd, Value};

use crate::error::QueueError;

/// A value of a record field.
pub(crate) trait WireValue {
    fn write(&self, cmd: &mut Cmd);
}

impl WireValue for str {
    fn write(&self, cmd: &mut Cmd) {
        cmd.arg(self);
    }
}

impl WireValue for String {
    fn write(&self, cmd: &mut Cmd) {
        cmd.arg(self.as_str());
    }
}

impl<T: WireValue + ?Sized> WireValue for &T {
    fn write(&self, cmd: &mut Cmd) {
        (**self).write(cmd);
    }
}

impl WireValue for u64 {
    fn write(&self, cmd: &mut Cmd) {
        cmd.arg(*self);
    }
}

impl WireValue for u32 {
    fn write(&self, cmd: &mut Cmd) {
        cmd.arg(*self);
    }
}

impl WireValue for i64 {
    fn write(&self, cmd: &mut Cmd) {
        cmd.arg(*self);
    }
}

impl WireValue for bool {
    fn write(&self, cmd: &mut Cmd) {
        cmd.arg(if *self { "1" } else { "0" });
    }
}

impl<T: WireValue> WireValue for Option<T> {
    fn write(&self, cmd: &mut Cmd) {
        match self {
            Some(value) => value.write(cmd),
            None => {
                cmd.arg("");
            }
        }
    }
}

/// A record a script reads by field name. Declare one with [`record!`].
pub(crate) trait Record {
    /// The field names, in the order [`Record::write`] sends the values.
    const FIELDS: &'static [&'static str];
    fn write(&self, cmd: &mut Cmd);
}

/// A header for scripts that take none.
pub(crate) struct NoHeader;

impl Record for NoHeader {
    const FIELDS: &'static [&'static str] = &[];
    fn write(&self, _cmd: &mut Cmd) {}
}

/// Declares a struct whose fields a script reads by name (see the module docs).
macro_rules! record {
    (
        $(#[$meta:meta])*
        struct $name:ident $(<$lt:lifetime>)? {
            $($(#[$fmeta:meta])* $field:ident: $ty:ty,)*
        }
    ) => {
        $(#[$meta])*
        pub(crate) struct $name $(<$lt>)? {
            $($(#[$fmeta])* pub(crate) $field: $ty,)*
        }

        impl $(<$lt>)? $crate::wire::Record for $name $(<$lt>)? {
            const FIELDS: &'static [&'static str] = &[$(stringify!($field)),*];
            fn write(&self, cmd: &mut redis::Cmd) {
                $($crate::wire::WireValue::write(&self.$field, cmd);)*
            }
        }
    };
}
pub(crate) use record;

fn write_names<R: Record>(cmd: &mut Cmd) {
    cmd.arg(R::FIELDS.len());
    for name in R::FIELDS {
        cmd.arg(*name);
    }
}

/// Appends a call's header and items to a script command (see the module docs).
pub(crate) fn write_call<'a, H: Record, I: Record + 'a>(
    cmd: &mut Cmd,
    header: &H,
    items: impl IntoIterator<Item = &'a I>,
) {
    write_names::<H>(cmd);
    header.write(cmd);
    write_names::<I>(cmd);
    for item in items {
        item.write(cmd);
    }
}

/// Appends a header and no items.
pub(crate) fn write_header<H: Record>(cmd: &mut Cmd, header: &H) {
    write_call::<H, NoHeader>(cmd, header, []);
}

/// Rows a script returned with `reply_rows`, read by field name.
#[derive(Debug)]
pub(crate) struct Rows {
    names: HashMap<String, usize>,
    width: usize,
    values: Vec<Value>,
}

impl Rows {
    pub(crate) fn parse(reply: Value) -> Result<Self, QueueError> {
        let bad = |what: &str| QueueError::Protocol(format!("script rows: {what}"));
        let Value::Array(mut values) = reply else {
            return Err(bad("not an array"));
        };
        if values.is_empty() {
            return Err(bad("no field count"));
        }
        let width = match values.remove(0) {
            Value::Int(n) if n > 0 => n as usize,
            _ => return Err(bad("field count is not a positive integer")),
        };
        if values.len() < width || (values.len() - width) % width != 0 {
            return Err(bad("values do not fill whole rows"));
        }
        let names = values
            .drain(..width)
            .enumerate()
            .map(|(i, name)| {
                text(&name)
                    .map(|name| (name, i))
                    .ok_or_else(|| bad("a field name is not text"))
            })
            .collect::<Result<_, _>>()?;
        Ok(Self {
            names,
            width,
            values,
        })
    }

    pub(crate) fn len(&self) -> usize {
        self.values.len() / self.width
    }

    /// Row `i`.
    pub(crate) fn row(&self, i: usize) -> Row<'_> {
        Row {
            rows: self,
            values: &self.values[i * self.width..(i + 1) * self.width],
        }
    }

    pub(crate) fn iter(&self) -> impl Iterator<Item = Row<'_>> {
        (0..self.len()).map(|i| self.row(i))
    }
}

/// One row of [`Rows`].
#[derive(Debug, Clone, Copy)]
pub(crate) struct Row<'a> {
    rows: &'a Rows,
    values: &'a [Value],
}

impl Row<'_> {
    /// A field as text (`""` when absent or nil). Panics on a name the script does not send:
    /// that is a mismatch between this crate's Rust and Lua, caught by any test.
    pub(crate) fn text(&self, name: &str) -> String {
        let i = self.index(name);
        text(&self.values[i]).unwrap_or_default()
    }

    /// A field as text, `None` when empty.
    pub(crate) fn opt(&self, name: &str) -> Option<String> {
        Some(self.text(name)).filter(|s| !s.is_empty())
    }

    /// A field as a number (0 when absent or not a number).
    pub(crate) fn number(&self, name: &str) -> u64 {
        match &self.values[self.index(name)] {
            Value::Int(n) => (*n).max(0) as u64,
            other => text(other).and_then(|s| s.parse().ok()).unwrap_or(0),
        }
    }

    fn index(&self, name: &str) -> usize {
        *self
            .rows
            .names
            .get(name)
            .unwrap_or_else(|| panic!("the script sends no field {name:?}"))
    }
}

fn text(value: &Value) -> Option<String> {
    match value {
        Value::BulkString(bytes) => Some(String::from_utf8_lossy(bytes).into_owned()),
        Value::SimpleString(s) => Some(s.clone()),
        Value::Int(n) => Some(n.to_string()),
        Value::Nil => None,
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    record! {
        struct Example<'a> {
            id: &'a str,
            count: u64,
            flag: bool,
            maybe: Option<String>,
        }
    }

    fn examples() -> [Example<'static>; 2] {
        [
            Example {
                id: "a",
                count: 2,
                flag: true,
                maybe: None,
            },
            Example {
                id: "b",
                count: 3,
                flag: false,
                maybe: Some("x".into()),
            },
        ]
    }

    fn args(cmd: &Cmd) -> Vec<String> {
        cmd.args_iter()
            .map(|arg| match arg {
                redis::Arg::Simple(bytes) => String::from_utf8_lossy(bytes).into_owned(),
                _ => "<other>".to_owned(),
            })
            .collect()
    }

    #[test]
    fn a_call_sends_names_then_values() {
        let mut cmd = redis::cmd("EVALSHA");
        let items = examples();
        write_call(&mut cmd, &NoHeader, &items);
        assert_eq!(
            args(&cmd),
            [
                "EVALSHA", "0", "4", "id", "count", "flag", "maybe", "a", "2", "1", "", "b", "3",
                "0", "x"
            ]
        );
    }

    #[test]
    fn rows_are_read_by_name() {
        let bulk = |s: &str| Value::BulkString(s.as_bytes().to_vec());
        let reply = Value::Array(vec![
            Value::Int(2),
            bulk("id"),
            bulk("n"),
            bulk("a"),
            Value::Int(7),
            bulk("b"),
            bulk("8"),
        ]);
        let rows = Rows::parse(reply).unwrap();
        assert_eq!(rows.len(), 2);
        assert_eq!(rows.row(0).text("id"), "a");
        assert_eq!(rows.row(0).number("n"), 7);
        assert_eq!(rows.row(1).number("n"), 8);
        assert_eq!(rows.row(1).opt("id").as_deref(), Some("b"));
    }

    /// A script reads the fields Rust sent by name, and a field Rust did not send is an
    /// error naming it, not a nil.
    #[tokio::test]
    async fn a_script_reads_fields_by_name_and_refuses_an_unknown_one() {
        klingq_testkit::redis::require_shared_redis().await.unwrap();
        let client = redis::Client::open(klingq_testkit::redis::redis_url()).unwrap();
        let mut conn = client.get_multiplexed_async_connection().await.unwrap();
        let items = examples();
        let eval = |body: &str| {
            let mut cmd = redis::cmd("EVAL");
            cmd.arg(crate::scripts::source(body))
                .arg(0)
                .arg("{wire-test}")
                .arg(1)
                .arg(1);
            write_call(&mut cmd, &NoHeader, &items);
            cmd
        };
        let read: Vec<String> = eval(
            "local out = {} for _, r in ipairs(ITEMS) do out[#out + 1] = r.id .. r.count .. r.flag .. r.maybe end return out",
        )
        .query_async(&mut conn)
        .await
        .unwrap();
        assert_eq!(read, ["a21", "b30x"]);
        let error = eval("return ITEMS[1].missing")
            .query_async::<redis::Value>(&mut conn)
            .await
            .unwrap_err();
        assert!(
            error
                .to_string()
                .contains("this call sends no field missing"),
            "{error}"
        );
    }

    #[test]
    fn rows_that_do_not_fill_whole_rows_are_an_error() {
        let reply = Value::Array(vec![
            Value::Int(2),
            Value::Int(1),
            Value::Int(2),
            Value::Int(3),
        ]);
        assert!(Rows::parse(reply).is_err());
    }
}
