//! Progress display as qemu-img's `-p`: `    (12.00/100%)` followed by a carriage return on stdout,
//! reprinted when the value moved by more than `min_skip` percent (and always at 0 and 100), and a
//! newline at the end.

use std::io::Write;

/// qemu-img's simple progress printer.
pub struct Progress {
    enabled: bool,
    current: f32,
    last_print: f32,
    min_skip: f32,
}

impl Progress {
    /// A printer; prints nothing when `enabled` is false.
    pub fn new(enabled: bool, min_skip: f32) -> Self {
        Progress {
            enabled,
            current: 0.0,
            last_print: 0.0,
            min_skip,
        }
    }

    /// Sets the absolute percentage (0..=100).
    pub fn set(&mut self, percent: f32) {
        self.update(percent.clamp(0.0, 100.0));
    }

    /// Adds `delta` percent.
    pub fn add(&mut self, delta: f32) {
        self.update((self.current + delta).clamp(0.0, 100.0));
    }

    fn update(&mut self, current: f32) {
        if !self.enabled {
            self.current = current;
            return;
        }
        if current > self.last_print + self.min_skip
            || current < self.last_print - self.min_skip
            || current == 0.0
            || current == 100.0
        {
            self.last_print = current;
            self.current = current;
            let mut out = std::io::stdout().lock();
            let _ = write!(out, "{}", Self::line(current));
            let _ = out.flush();
        } else {
            self.current = current;
        }
    }

    /// The text printed for `percent` (`"    (12.00/100%)\r"`).
    pub fn line(percent: f32) -> String {
        format!("    ({:.2}/100%)\r", percent)
    }

    /// Ends the display with a newline.
    pub fn end(&mut self) {
        if self.enabled {
            let mut out = std::io::stdout().lock();
            let _ = writeln!(out);
            let _ = out.flush();
            self.enabled = false;
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn line_format() {
        assert_eq!(super::Progress::line(0.0), "    (0.00/100%)\r");
        assert_eq!(super::Progress::line(68.0), "    (68.00/100%)\r");
        assert_eq!(super::Progress::line(100.0), "    (100.00/100%)\r");
    }
}
