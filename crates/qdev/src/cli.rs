//! The `--device` and `--global` option syntax.
//!
//! Kept apart from resolution so that the VMM's CLI, its QMP `device_add` and the tests
//! all build the same [`DeviceSpec`]/[`GlobalProperty`] values, and so that syntax errors
//! (a stray comma) are reported before any type lookup.
//!
//! The syntax is QEMU's: `TYPE,id=ID,key=value,...`, a doubled comma `,,` stands for a
//! literal comma inside a value, and `TYPE,help` asks for the property list.

use std::fmt;
use std::str::FromStr;

use crate::error::PropertyError;

/// A parsed `--device TYPE,id=ID,key=value,...`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DeviceSpec {
    /// The device type name.
    pub driver: String,
    /// The device id (`id=`), which names the device in errors, QMP and migration.
    pub id: Option<String>,
    /// The explicit properties, in the order given.
    pub properties: Vec<(String, String)>,
    /// `help` was given: list the type's properties instead of creating a device.
    pub help: bool,
}

impl DeviceSpec {
    /// A spec for `driver` with id `id` and no properties, for building in code.
    pub fn new(driver: impl Into<String>, id: impl Into<String>) -> Self {
        DeviceSpec {
            driver: driver.into(),
            id: Some(id.into()),
            ..Self::default()
        }
    }

    /// Adds an explicit `key=value`.
    pub fn with(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.properties.push((key.into(), value.into()));
        self
    }

    /// Parses the text of one `--device` option.
    ///
    /// ```
    /// use baton_qdev::DeviceSpec;
    ///
    /// let spec = DeviceSpec::parse("virtio-net-tap,id=net0,queues=4,ifname=tap,,0")?;
    /// assert_eq!(spec.driver, "virtio-net-tap");
    /// assert_eq!(spec.id.as_deref(), Some("net0"));
    /// assert_eq!(spec.properties, [("queues".into(), "4".into()), ("ifname".into(), "tap,0".into())]);
    /// # Ok::<(), baton_qdev::PropertyError>(())
    /// ```
    pub fn parse(input: &str) -> Result<Self, PropertyError> {
        let syntax = |reason: String| PropertyError::Syntax {
            option: "--device",
            input: input.to_owned(),
            reason,
        };
        let mut options = split_options(input).into_iter();
        let first = options.next().unwrap_or_default();
        let driver = first.strip_prefix("driver=").unwrap_or(&first).to_owned();
        if driver.is_empty() {
            return Err(syntax("the device type is missing".to_owned()));
        }
        if driver.contains('=') {
            return Err(syntax(format!(
                "the first item must be the device type, got '{driver}'"
            )));
        }
        let mut spec = DeviceSpec {
            driver,
            ..Self::default()
        };
        for option in options {
            if option == "help" || option == "?" {
                spec.help = true;
                continue;
            }
            let Some((key, value)) = option.split_once('=') else {
                return Err(syntax(if option.is_empty() {
                    "empty item (a value's comma must be doubled: ',,')".to_owned()
                } else {
                    format!("expected KEY=VALUE, got '{option}'")
                }));
            };
            if key.is_empty() {
                return Err(syntax(format!("missing property name in '{option}'")));
            }
            if key == "id" {
                if spec.id.is_some() {
                    return Err(syntax("id is given twice".to_owned()));
                }
                check_id(value).map_err(syntax)?;
                spec.id = Some(value.to_owned());
            } else {
                spec.properties.push((key.to_owned(), value.to_owned()));
            }
        }
        Ok(spec)
    }
}

impl FromStr for DeviceSpec {
    type Err = PropertyError;

    fn from_str(input: &str) -> Result<Self, Self::Err> {
        Self::parse(input)
    }
}

/// The option text that parses back to this spec.
impl fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&escape(&self.driver))?;
        if let Some(id) = &self.id {
            write!(f, ",id={}", escape(id))?;
        }
        for (key, value) in &self.properties {
            write!(f, ",{}={}", escape(key), escape(value))?;
        }
        if self.help {
            f.write_str(",help")?;
        }
        Ok(())
    }
}

/// A parsed `--global DRIVER.PROPERTY=VALUE`. `DRIVER` may be an abstract parent, in
/// which case it applies to every subtype that has the property.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GlobalProperty {
    /// Type name, concrete or abstract.
    pub driver: String,
    /// Property name.
    pub property: String,
    /// Value text, parsed against each matching type's schema.
    pub value: String,
}

impl GlobalProperty {
    /// A global setting, for building in code.
    pub fn new(
        driver: impl Into<String>,
        property: impl Into<String>,
        value: impl Into<String>,
    ) -> Self {
        GlobalProperty {
            driver: driver.into(),
            property: property.into(),
            value: value.into(),
        }
    }

    /// Parses the text of one `--global` option.
    ///
    /// ```
    /// use baton_qdev::GlobalProperty;
    ///
    /// let g = GlobalProperty::parse("virtio-net-tap.queues=2")?;
    /// assert_eq!((g.driver.as_str(), g.property.as_str(), g.value.as_str()),
    ///            ("virtio-net-tap", "queues", "2"));
    /// # Ok::<(), baton_qdev::PropertyError>(())
    /// ```
    pub fn parse(input: &str) -> Result<Self, PropertyError> {
        let syntax = |reason: &str| PropertyError::Syntax {
            option: "--global",
            input: input.to_owned(),
            reason: reason.to_owned(),
        };
        let (target, value) = input
            .split_once('=')
            .ok_or_else(|| syntax("expected DRIVER.PROPERTY=VALUE"))?;
        let (driver, property) = target
            .split_once('.')
            .ok_or_else(|| syntax("expected DRIVER.PROPERTY=VALUE"))?;
        if driver.is_empty() {
            return Err(syntax("the driver name is missing"));
        }
        if property.is_empty() {
            return Err(syntax("the property name is missing"));
        }
        Ok(GlobalProperty::new(driver, property, value))
    }
}

impl FromStr for GlobalProperty {
    type Err = PropertyError;

    fn from_str(input: &str) -> Result<Self, Self::Err> {
        Self::parse(input)
    }
}

impl fmt::Display for GlobalProperty {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}={}", self.driver, self.property, self.value)
    }
}

/// Splits on single commas; `,,` is a literal comma.
fn split_options(input: &str) -> Vec<String> {
    let mut options = vec![String::new()];
    let mut chars = input.chars().peekable();
    while let Some(c) = chars.next() {
        if c != ',' {
            if let Some(current) = options.last_mut() {
                current.push(c);
            }
        } else if chars.peek() == Some(&',') {
            chars.next();
            if let Some(current) = options.last_mut() {
                current.push(',');
            }
        } else {
            options.push(String::new());
        }
    }
    options
}

fn escape(text: &str) -> String {
    text.replace(',', ",,")
}

fn check_id(id: &str) -> Result<(), String> {
    let mut chars = id.chars();
    let starts_with_letter = chars.next().is_some_and(|c| c.is_ascii_alphabetic());
    let rest_ok = chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if starts_with_letter && rest_ok {
        Ok(())
    } else {
        Err(format!(
            "id '{id}' must start with a letter and contain only letters, digits, '-', '_' and '.'"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_spec() {
        let spec =
            DeviceSpec::parse("virtio-net-tap,id=net0,queues=4,mac=52:54:00:00:00:01").unwrap();
        assert_eq!(
            spec,
            DeviceSpec::new("virtio-net-tap", "net0")
                .with("queues", "4")
                .with("mac", "52:54:00:00:00:01")
        );
        assert_eq!(
            spec.to_string(),
            "virtio-net-tap,id=net0,queues=4,mac=52:54:00:00:00:01"
        );

        let help = DeviceSpec::parse("virtio-net-tap,help").unwrap();
        assert!(help.help && help.id.is_none());
        assert_eq!(
            DeviceSpec::parse("driver=vhost-user-blk,id=b")
                .unwrap()
                .driver,
            "vhost-user-blk"
        );

        let escaped = DeviceSpec::parse("x,id=a,path=/tmp/a,,b,,").unwrap();
        assert_eq!(
            escaped.properties,
            [("path".to_owned(), "/tmp/a,b,".to_owned())]
        );
        assert_eq!(escaped.to_string().parse::<DeviceSpec>().unwrap(), escaped);
        assert_eq!(
            DeviceSpec::parse("x,id=a,v=k=v").unwrap().properties[0].1,
            "k=v"
        );
    }

    #[test]
    fn device_spec_errors() {
        let err = |s: &str| DeviceSpec::parse(s).unwrap_err().to_string();
        assert_eq!(err(""), "invalid --device '': the device type is missing");
        assert_eq!(
            err("virtio-net-tap,id=net0,mq"),
            "invalid --device 'virtio-net-tap,id=net0,mq': expected KEY=VALUE, got 'mq'"
        );
        assert_eq!(
            err("virtio-net-tap,id=net0,,"),
            "invalid --device 'virtio-net-tap,id=net0,,': id 'net0,' must start with a letter and contain only letters, digits, '-', '_' and '.'"
        );
        assert_eq!(
            err("virtio-net-tap,,id=net0"),
            "invalid --device 'virtio-net-tap,,id=net0': the first item must be the device type, got 'virtio-net-tap,id=net0'"
        );
        assert_eq!(
            err("virtio-net-tap,id=net0,"),
            "invalid --device 'virtio-net-tap,id=net0,': empty item (a value's comma must be doubled: ',,')"
        );
        assert_eq!(
            err("t,id=a,id=b"),
            "invalid --device 't,id=a,id=b': id is given twice"
        );
        assert_eq!(
            err("t,=3"),
            "invalid --device 't,=3': missing property name in '=3'"
        );
        assert!(err("t,id=0net").contains("must start with a letter"));
    }

    #[test]
    fn global() {
        let g = GlobalProperty::parse("virtio-device.early-setup=off").unwrap();
        assert_eq!(
            g,
            GlobalProperty::new("virtio-device", "early-setup", "off")
        );
        assert_eq!(g.to_string(), "virtio-device.early-setup=off");
        assert_eq!(GlobalProperty::parse("a.b=").unwrap().value, "");
        let err = |s: &str| GlobalProperty::parse(s).unwrap_err().to_string();
        assert_eq!(
            err("queues=2"),
            "invalid --global 'queues=2': expected DRIVER.PROPERTY=VALUE"
        );
        assert_eq!(
            err("a.b"),
            "invalid --global 'a.b': expected DRIVER.PROPERTY=VALUE"
        );
        assert_eq!(
            err(".b=1"),
            "invalid --global '.b=1': the driver name is missing"
        );
        assert_eq!(
            err("a.=1"),
            "invalid --global 'a.=1': the property name is missing"
        );
    }
}
