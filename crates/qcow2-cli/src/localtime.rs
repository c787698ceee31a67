//! Local-time formatting for the snapshot table (`%Y-%m-%d %H:%M:%S`, as qemu-img prints dates).

/// Formats `secs` since the epoch in the local time zone as `YYYY-MM-DD HH:MM:SS`.
/// Falls back to UTC arithmetic when the C library cannot convert the value.
pub fn format_local(secs: u64) -> String {
    let t: libc::time_t = match libc::time_t::try_from(secs) {
        Ok(t) => t,
        Err(_) => return utc(secs),
    };
    // SAFETY: `tm` is a plain C struct for which all-zero bytes are a valid value; `localtime_r` only
    // writes into the struct we pass and reads `t`, both valid for the duration of the call.
    let mut tm: libc::tm = unsafe { std::mem::zeroed() };
    let ok = unsafe { !libc::localtime_r(&t, &mut tm).is_null() };
    if !ok {
        return utc(secs);
    }
    format!(
        "{:04}-{:02}-{:02} {:02}:{:02}:{:02}",
        i64::from(tm.tm_year) + 1900,
        tm.tm_mon + 1,
        tm.tm_mday,
        tm.tm_hour,
        tm.tm_min,
        tm.tm_sec
    )
}

/// UTC civil date from days since the epoch (Howard Hinnant's algorithm).
fn utc(secs: u64) -> String {
    let days = (secs / 86400) as i64;
    let rem = secs % 86400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{:04}-{:02}-{:02} {:02}:{:02}:{:02}",
        y,
        m,
        d,
        rem / 3600,
        (rem / 60) % 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    #[test]
    fn utc_fallback() {
        assert_eq!(super::utc(0), "1970-01-01 00:00:00");
        assert_eq!(super::utc(1_795_889_382), "2026-11-28 18:09:42");
    }
}
