use std::fmt;

use chrono::TimeDelta;

/// A rolling window over which a limit bounds committed + held spend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Window {
    Daily,
    Weekly,
    Monthly,
    Annual,
}

impl Window {
    /// Every window, in the order used for per-window arrays (`[T; 4]` indexed by [`Window::index`]).
    pub const ALL: [Window; 4] = [Window::Daily, Window::Weekly, Window::Monthly, Window::Annual];

    /// The window's length: a spend counts while `now - created_at < length`.
    pub fn length(self) -> TimeDelta {
        match self {
            Window::Daily => TimeDelta::hours(24),
            Window::Weekly => TimeDelta::days(7),
            Window::Monthly => TimeDelta::days(30),
            Window::Annual => TimeDelta::days(365),
        }
    }

    pub fn index(self) -> usize {
        self as usize
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Window::Daily => "daily",
            Window::Weekly => "weekly",
            Window::Monthly => "monthly",
            Window::Annual => "annual",
        }
    }
}

impl fmt::Display for Window {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Window {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Window::ALL
            .into_iter()
            .find(|w| w.as_str().eq_ignore_ascii_case(s))
            .ok_or_else(|| format!("unknown window {s:?}: expected daily, weekly, monthly or annual"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_are_indexed_in_order_and_grow() {
        for (i, w) in Window::ALL.into_iter().enumerate() {
            assert_eq!(w.index(), i);
        }
        assert!(Window::ALL.windows(2).all(|p| p[0].length() < p[1].length()));
    }

    #[test]
    fn windows_parse_from_their_names() {
        assert_eq!("Weekly".parse::<Window>(), Ok(Window::Weekly));
        assert!("hourly".parse::<Window>().is_err());
    }
}
