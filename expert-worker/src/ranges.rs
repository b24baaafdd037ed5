//! Comma-separated lists of inclusive ranges (`0-3,8,10-11`), the one syntax of CPU lists
//! (`--cpus`, sysfs `cpulist`) and expert/layer lists (`--experts`).

/// Why a list did not parse.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum RangeError {
    /// An item (or one end of a range) that is not a non-negative integer.
    NotANumber(String),
    /// `b-a` with b > a.
    Backwards(String),
    /// A value at or above the caller's bound.
    TooLarge(usize),
}

/// The values of `s` in the order written (ranges expanded), each below `bound`.
pub(crate) fn parse_ranges(s: &str, bound: usize) -> Result<Vec<usize>, RangeError> {
    let mut out = Vec::new();
    for item in s.trim().split(',').map(str::trim) {
        let num = |t: &str| t.trim().parse::<usize>().map_err(|_| RangeError::NotANumber(t.trim().to_string()));
        let (lo, hi) = match item.split_once('-') {
            Some((a, b)) => (num(a)?, num(b)?),
            None => {
                let v = num(item)?;
                (v, v)
            }
        };
        if lo > hi {
            return Err(RangeError::Backwards(item.to_string()));
        }
        if hi >= bound {
            return Err(RangeError::TooLarge(hi));
        }
        out.extend(lo..=hi);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::{parse_ranges, RangeError};

    #[test]
    fn ranges_expand_in_order_and_bad_items_are_named() {
        assert_eq!(parse_ranges(" 3,0-2, 5\n", 8), Ok(vec![3, 0, 1, 2, 5]));
        assert_eq!(parse_ranges("1,,2", 8), Err(RangeError::NotANumber(String::new())));
        assert_eq!(parse_ranges("x-2", 8), Err(RangeError::NotANumber("x".into())));
        assert_eq!(parse_ranges("4-1", 8), Err(RangeError::Backwards("4-1".into())));
        assert_eq!(parse_ranges("6-8", 8), Err(RangeError::TooLarge(8)));
    }
}
