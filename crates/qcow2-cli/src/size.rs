//! Sizes as qemu-img reads and prints them.
//!
//! - [`parse_size`] accepts what qemu-img's `cvtnum`/`qemu_strtosz` accept on the command line: a decimal
//!   number (a fraction is allowed with a suffix) with an optional unit suffix `B`, `K`, `M`, `G`, `T`,
//!   `P`, `E` (case-insensitive, powers of 1024).
//! - [`size_to_str`] prints a byte count the way QEMU's `size_to_str()` does (`"388 KiB"`, `"3.38 MiB"`,
//!   `"64 MiB"`): the largest binary unit for which the value is at least 1000/1024 of it, and the value
//!   with three significant digits as C's `%0.3g` prints it (round half to even on the exact value).

/// Why a size argument was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SizeError {
    /// Not a number, or an unknown suffix.
    #[error("invalid size '{0}'")]
    Invalid(String),
    /// Larger than `i64::MAX` bytes (qemu-img's limit).
    #[error("size '{0}' is too large (at most 8 EiB - 1)")]
    TooLarge(String),
}

/// Parses a size argument the way qemu-img does (`4096`, `4k`, `1.5M`, `2G`, `512b`).
pub fn parse_size(text: &str) -> Result<u64, SizeError> {
    let invalid = || SizeError::Invalid(text.to_string());
    let s = text.trim();
    if s.is_empty() {
        return Err(invalid());
    }
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (num, suffix) = s.split_at(split);
    let shift: u32 = match suffix {
        "" | "b" | "B" => 0,
        "k" | "K" => 10,
        "m" | "M" => 20,
        "g" | "G" => 30,
        "t" | "T" => 40,
        "p" | "P" => 50,
        "e" | "E" => 60,
        _ => return Err(invalid()),
    };
    let (int_part, frac_part) = match num.split_once('.') {
        Some((i, f)) => (i, Some(f)),
        None => (num, None),
    };
    if int_part.is_empty() || !int_part.bytes().all(|b| b.is_ascii_digit()) {
        return Err(invalid());
    }
    let int: u128 = int_part
        .parse()
        .map_err(|_| SizeError::TooLarge(text.to_string()))?;
    let mut value: u128 = int
        .checked_shl(shift)
        .filter(|v| (v >> shift) == int)
        .ok_or_else(|| SizeError::TooLarge(text.to_string()))?;
    if let Some(frac) = frac_part {
        // As qemu: a fraction only makes sense with a unit, and must not be empty.
        if frac.is_empty() || !frac.bytes().all(|b| b.is_ascii_digit()) || shift == 0 {
            return Err(invalid());
        }
        // Exact: value += frac / 10^len * 2^shift, truncated. Limit digits to keep u128 exact.
        let digits = &frac[..frac.len().min(18)];
        let f: u128 = digits.parse().map_err(|_| invalid())?;
        let den: u128 = 10u128.pow(digits.len() as u32);
        value += (f << shift) / den;
    }
    if value > i64::MAX as u128 {
        return Err(SizeError::TooLarge(text.to_string()));
    }
    Ok(value as u64)
}

/// Formats `val` bytes as QEMU's `size_to_str()` does, e.g. `"64 MiB"`, `"3.38 MiB"`, `"0 B"`.
pub fn size_to_str(val: u64) -> String {
    const SUFFIXES: [&str; 7] = ["", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei"];
    // QEMU: frexp(val / (1000.0 / 1024.0), &e); i = (e - 1) / 10. That is the largest i with
    // 1000 * 2^(10 i) <= 1024 * val (and 0 for val == 0).
    let scaled = (val as u128) * 1024;
    let mut i = 0usize;
    while i + 1 < SUFFIXES.len() && 1000u128 << (10 * (i as u32 + 1)) <= scaled {
        i += 1;
    }
    format!("{} {}B", format_g3_dyadic(val, 10 * i as u32), SUFFIXES[i])
}

/// `printf("%0.3g", val / 2^shift)` computed exactly (the quotient is a dyadic rational, so the decimal
/// rounding can be done in integers, half to even as glibc does).
fn format_g3_dyadic(val: u64, shift: u32) -> String {
    const PRECISION: i32 = 3;
    if val == 0 {
        return "0".to_string();
    }
    let v = val as u128;
    let den: u128 = 1u128 << shift;
    // Decimal exponent x: 10^x <= v / den < 10^(x+1).
    let mut x: i32 = 0;
    while v >= pow10(x + 1) * den {
        x += 1;
    }
    // For v / den < 1 (only possible as ~0.977 .. 1 here): decrease x.
    while x > -30 && v * pow10(-x) < den {
        x -= 1;
    }
    // n = round_half_even(v / den * 10^(P-1-x)), a P-digit integer (or 10^P after rounding up).
    let e = PRECISION - 1 - x;
    let (num, den2) = if e >= 0 {
        (v * pow10(e), den)
    } else {
        (v, den * pow10(-e))
    };
    let mut n = num / den2;
    let rem = num % den2;
    if rem * 2 > den2 || (rem * 2 == den2 && n % 2 == 1) {
        n += 1;
    }
    if n == pow10(PRECISION) {
        n /= 10;
        x += 1;
    }
    let digits = n.to_string();
    if !(-4..PRECISION).contains(&x) {
        let mut mantissa = digits[..1].to_string();
        let rest = digits[1..].trim_end_matches('0');
        if !rest.is_empty() {
            mantissa.push('.');
            mantissa.push_str(rest);
        }
        let sign = if x < 0 { '-' } else { '+' };
        return format!("{mantissa}e{sign}{:02}", x.abs());
    }
    // Fixed notation: n * 10^(x - (P-1)).
    let decimals = (PRECISION - 1 - x) as usize;
    let s = if decimals == 0 {
        digits
    } else {
        let padded = format!("{:0>width$}", digits, width = decimals + 1);
        let (int, frac) = padded.split_at(padded.len() - decimals);
        let frac = frac.trim_end_matches('0');
        if frac.is_empty() {
            int.to_string()
        } else {
            format!("{int}.{frac}")
        }
    };
    s
}

fn pow10(e: i32) -> u128 {
    10u128.pow(e.max(0) as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn size_to_str_matches_qemu() {
        assert_eq!(size_to_str(0), "0 B");
        assert_eq!(size_to_str(1), "1 B");
        assert_eq!(size_to_str(999), "999 B");
        assert_eq!(size_to_str(1000), "0.977 KiB");
        assert_eq!(size_to_str(1024), "1 KiB");
        assert_eq!(size_to_str(4096), "4 KiB");
        assert_eq!(size_to_str(397312), "388 KiB");
        assert_eq!(size_to_str(458752), "448 KiB");
        assert_eq!(size_to_str(3538944), "3.38 MiB");
        assert_eq!(size_to_str(3477504), "3.32 MiB");
        assert_eq!(size_to_str(67108864), "64 MiB");
        assert_eq!(size_to_str(10485760), "10 MiB");
        // 1.125 KiB is an exact tie: glibc rounds half to even.
        assert_eq!(size_to_str(1152), "1.12 KiB");
        assert_eq!(size_to_str(1664), "1.62 KiB"); // 1.625
        assert_eq!(size_to_str(1023 * 1024), "0.999 MiB");
        // %0.3g switches to exponent notation when rounding reaches 1000 (a QEMU quirk we keep).
        assert_eq!(size_to_str(1_023_800), "1e+03 KiB");
        assert_eq!(size_to_str(u64::MAX), "16 EiB");
    }

    #[test]
    fn parse_size_accepts_qemu_syntax() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("4k"), Ok(4096));
        assert_eq!(parse_size("4K"), Ok(4096));
        assert_eq!(parse_size("2M"), Ok(2 << 20));
        assert_eq!(parse_size("1.5M"), Ok(3 << 19));
        assert_eq!(parse_size("1G"), Ok(1 << 30));
        assert_eq!(parse_size("512b"), Ok(512));
        assert!(parse_size("").is_err());
        assert!(parse_size("abc").is_err());
        assert!(parse_size("4x").is_err());
        assert!(parse_size("-1").is_err());
        assert!(parse_size("1.5").is_err());
        assert!(matches!(parse_size("8E"), Err(SizeError::TooLarge(_))));
        assert!(matches!(
            parse_size("99999999999999999999999999999999999999999"),
            Err(SizeError::TooLarge(_))
        ));
    }
}
