//! The model: recognisable data patterns, and the check of a disk state (or of a read) against the
//! requests of a round that ran concurrently.
//!
//! Every byte a request writes identifies the request: byte `o` of request `id` holds
//! `1 + (id + h(o)) mod 255`, with `h` a fixed pseudo-random function of the offset (period `P`, a
//! prime that no cluster size divides). So two requests never write the same value at the same
//! offset, zero is never data, and data moved to another offset is recognised as wrong.
//!
//! After a round, the disk is cut into pieces: maximal byte ranges within one 512-byte sector that
//! the same set `T` of the round's mutating requests touched. A piece nobody touched must hold its
//! previous value; a touched piece must hold, whole, the value of one request of `T` (several zeroing
//! requests can all explain a zero piece). The requests that can explain a piece are its "winners";
//! a serial order of the round must exist in which, for every piece, the last request of `T` is one
//! of its winners ("the winner relation is acyclic"). That order is required within each atomic unit
//! (a cluster, or a subcluster with extended L2; see `sim.rs` for why not across them).

use std::sync::OnceLock;

use crate::rng::Rng;

/// Period of the offset function of the patterns.
pub const P: usize = 65521;
/// Largest request id (ids are per seed, 1..=MAX_ID).
pub const MAX_ID: u8 = 63;
/// The id of the data of the backing file.
pub const BASE_ID: u8 = 250;
const SECTOR: u64 = 512;
/// Rows are this much longer than the period, so that any piece (at most a sector) is one slice.
const ROW_EXTRA: usize = 1024;

pub struct Patterns {
    h: Vec<u8>,
    rows: Vec<Vec<u8>>,
    zeros: Vec<u8>,
}

impl Patterns {
    pub fn get() -> &'static Patterns {
        static PATTERNS: OnceLock<Patterns> = OnceLock::new();
        PATTERNS.get_or_init(|| {
            let mut rng = Rng::new(0x5EED_0F0F_F5E7);
            let h: Vec<u8> = (0..P).map(|_| (rng.below(255)) as u8).collect();
            let mut rows = vec![Vec::new(); 256];
            for id in (0..=MAX_ID).chain([BASE_ID]) {
                let row: Vec<u8> = (0..P + ROW_EXTRA).map(|i| value_of(id, h[i % P])).collect();
                rows[usize::from(id)] = row;
            }
            Patterns {
                h,
                rows,
                zeros: vec![0; ROW_EXTRA],
            }
        })
    }

    /// The bytes request `id` writes at `[off, off + len)`, `len <= 1024`.
    pub fn slice(&self, id: u8, off: u64, len: usize) -> &[u8] {
        let i = (off % P as u64) as usize;
        &self.rows[usize::from(id)][i..i + len]
    }

    /// The data of request `id` for `[off, off + len)`, any length.
    pub fn fill(&self, id: u8, off: u64, len: usize) -> Vec<u8> {
        let row = &self.rows[usize::from(id)];
        let mut v = Vec::with_capacity(len);
        let mut o = off;
        while v.len() < len {
            let i = (o % P as u64) as usize;
            let n = (len - v.len()).min(P - i);
            v.extend_from_slice(&row[i..i + n]);
            o += n as u64;
        }
        v
    }

    pub fn zeros(&self, len: usize) -> &[u8] {
        &self.zeros[..len]
    }

    /// Which request wrote value `v` at offset `off` (None for zero).
    pub fn decode(&self, off: u64, v: u8) -> Option<u8> {
        if v == 0 {
            return None;
        }
        let h = u32::from(self.h[(off % P as u64) as usize]);
        Some(((u32::from(v) + 2 * 255 - 1 - h) % 255) as u8)
    }
}

fn value_of(id: u8, h: u8) -> u8 {
    1 + ((u32::from(id) + u32::from(h)) % 255) as u8
}

/// What a request of a round does to the disk, as the model sees it.
#[derive(Debug, Clone)]
pub struct Mutation {
    pub id: u8,
    /// Byte ranges `[a, b)` it sets (a discard: only the clusters it really discards).
    pub ranges: Vec<(u64, u64)>,
    /// Sets zeros (zero write, discard) rather than its data pattern.
    pub zero: bool,
    /// Cancelled before it completed: it may have taken effect in some atomic units and not in others.
    pub optional: bool,
}

impl Mutation {
    fn expect<'p>(&self, pats: &'p Patterns, a: u64, b: u64) -> &'p [u8] {
        let len = (b - a) as usize;
        if self.zero {
            pats.zeros(len)
        } else {
            pats.slice(self.id, a, len)
        }
    }

    fn touches(&self, a: u64, b: u64) -> bool {
        self.ranges.iter().any(|&(ra, rb)| ra <= a && rb >= b)
    }

    fn name(&self) -> String {
        format!("#{}{}", self.id, if self.zero { "(zeros)" } else { "" })
    }
}

/// Calls `f(a, b, touching)` for every piece of `[lo, hi)`: within one sector, the same set of
/// mutations (indices into `muts`) touches all of `[a, b)`.
fn for_pieces(
    lo: u64,
    hi: u64,
    muts: &[Mutation],
    mut f: impl FnMut(u64, u64, &[usize]) -> Result<(), String>,
) -> Result<(), String> {
    let mut s = lo;
    let mut pts = Vec::new();
    let mut touch = Vec::new();
    while s < hi {
        let e = hi.min((s / SECTOR + 1) * SECTOR);
        pts.clear();
        pts.extend([s, e]);
        let mut any = false;
        for m in muts {
            for &(ra, rb) in &m.ranges {
                if ra < e && rb > s {
                    any = true;
                    if ra > s {
                        pts.push(ra);
                    }
                    if rb < e {
                        pts.push(rb);
                    }
                }
            }
        }
        if !any {
            f(s, e, &[])?;
        } else {
            pts.sort_unstable();
            pts.dedup();
            for w in pts.windows(2) {
                let (a, b) = (w[0], w[1]);
                touch.clear();
                touch.extend((0..muts.len()).filter(|&i| muts[i].touches(a, b)));
                f(a, b, &touch)?;
            }
        }
        s = e;
    }
    Ok(())
}

/// What a piece of the disk holds, in words.
pub fn describe(pats: &Patterns, a: u64, bytes: &[u8]) -> String {
    if bytes.iter().all(|&b| b == 0) {
        return "zeros".into();
    }
    let who = |id: u8| {
        if id == BASE_ID {
            "backing data".to_string()
        } else {
            format!("data of #{id}")
        }
    };
    match pats.decode(a, bytes[0]) {
        Some(id) if usize::from(id) < pats.rows.len() && !pats.rows[usize::from(id)].is_empty() => {
            if pats.slice(id, a, bytes.len()) == bytes {
                who(id)
            } else {
                let same = bytes
                    .iter()
                    .zip(pats.slice(id, a, bytes.len()))
                    .take_while(|(x, y)| x == y)
                    .count();
                format!(
                    "{} for {same} bytes, then {:02x?}...",
                    who(id),
                    &bytes[same..bytes.len().min(same + 8)]
                )
            }
        }
        _ => format!(
            "unrecognised bytes {:02x?}...",
            &bytes[..bytes.len().min(8)]
        ),
    }
}

/// One ordering constraint: the last of `touch` (in the serial order) must be one of `winners`.
struct Constraint {
    unit: u64,
    a: u64,
    b: u64,
    touch: Vec<usize>,
    winners: Vec<usize>,
}

/// Finds a serial order satisfying every constraint, building it from the back: a request can be
/// placed last (among those not placed yet) when it is a winner of every unresolved constraint it
/// appears in. Placing one never makes another unplaceable, so the greedy search is complete.
/// Returns the constraints left unresolved when stuck (a cycle).
fn serial_order<'c>(n: usize, cons: &[&'c Constraint]) -> Result<(), Vec<&'c Constraint>> {
    let mut placed = vec![false; n];
    let mut resolved = vec![false; cons.len()];
    loop {
        if resolved.iter().all(|&r| r) {
            return Ok(());
        }
        let pick = (0..n).find(|&r| {
            !placed[r]
                && cons
                    .iter()
                    .enumerate()
                    .any(|(i, c)| !resolved[i] && c.touch.contains(&r))
                && cons
                    .iter()
                    .enumerate()
                    .all(|(i, c)| resolved[i] || !c.touch.contains(&r) || c.winners.contains(&r))
        });
        let Some(r) = pick else {
            return Err(cons
                .iter()
                .enumerate()
                .filter(|(i, _)| !resolved[*i])
                .map(|(_, c)| *c)
                .collect());
        };
        placed[r] = true;
        for (i, c) in cons.iter().enumerate() {
            if c.touch.contains(&r) {
                resolved[i] = true;
            }
        }
    }
}

/// The pieces of a cycle "x wins over y, y wins over ... over x" among the stuck constraints (those
/// with one winner); all stuck constraints when no such cycle exists.
fn explain_cycle<'c>(n: usize, stuck: &[&'c Constraint]) -> Vec<&'c Constraint> {
    // edge[x][y]: a piece where x won over y.
    let mut edge: Vec<Vec<Option<&Constraint>>> = vec![vec![None; n]; n];
    for c in stuck {
        if let [w] = c.winners[..] {
            for &t in &c.touch {
                if t != w && edge[w][t].is_none() {
                    edge[w][t] = Some(*c);
                }
            }
        }
    }
    // Depth-first search for a cycle.
    fn dfs(
        v: usize,
        edge: &[Vec<Option<&Constraint>>],
        state: &mut [u8],
        path: &mut Vec<usize>,
    ) -> Option<Vec<usize>> {
        state[v] = 1;
        path.push(v);
        for u in 0..edge.len() {
            if edge[v][u].is_none() {
                continue;
            }
            if state[u] == 1 {
                let i = path.iter().position(|&x| x == u).unwrap_or(0);
                return Some(path[i..].to_vec());
            }
            if state[u] == 0 {
                if let Some(c) = dfs(u, edge, state, path) {
                    return Some(c);
                }
            }
        }
        path.pop();
        state[v] = 2;
        None
    }
    let mut state = vec![0u8; n];
    for v in 0..n {
        if state[v] == 0 {
            let mut path = Vec::new();
            if let Some(cyc) = dfs(v, &edge, &mut state, &mut path) {
                return (0..cyc.len())
                    .filter_map(|i| edge[cyc[i]][cyc[(i + 1) % cyc.len()]])
                    .collect();
            }
        }
    }
    stuck.to_vec()
}

fn names(muts: &[Mutation], idx: &[usize]) -> String {
    idx.iter()
        .map(|&i| muts[i].name())
        .collect::<Vec<_>>()
        .join(", ")
}

/// What the check of a round found besides failures.
#[derive(Debug, Default, Clone, Copy)]
pub struct RoundStats {
    /// Pieces touched by several requests (where the order mattered).
    pub contested: u64,
    /// No single serial order explains the whole disk (only atomic units must be serialisable).
    pub cross_unit_cycle: bool,
}

/// Checks the disk `obs` after a round against `prev` (the state before it) and the round's
/// mutations. `unit`: the atomic unit (cluster, or subcluster with extended L2).
pub fn check_state(
    pats: &Patterns,
    prev: &[u8],
    obs: &[u8],
    muts: &[Mutation],
    unit: u64,
) -> Result<RoundStats, String> {
    let mut cons = Vec::new();
    for_pieces(0, obs.len() as u64, muts, |a, b, touch| {
        let o = &obs[a as usize..b as usize];
        if touch.is_empty() {
            if o != &prev[a as usize..b as usize] {
                return Err(format!(
                    "bytes [{a}, {b}) were touched by no request of the round but changed: \
                     were {}, now {}",
                    describe(pats, a, &prev[a as usize..b as usize]),
                    describe(pats, a, o)
                ));
            }
            return Ok(());
        }
        if o == &prev[a as usize..b as usize] && touch.iter().all(|&i| muts[i].optional) {
            // Only cancelled requests touched it, and none of them took effect here.
            return Ok(());
        }
        let winners: Vec<usize> = touch
            .iter()
            .copied()
            .filter(|&i| muts[i].expect(pats, a, b) == o)
            .collect();
        if winners.is_empty() {
            return Err(format!(
                "bytes [{a}, {b}) hold {}; the requests touching them: {}; before the round: {}",
                describe(pats, a, o),
                names(muts, touch),
                describe(pats, a, &prev[a as usize..b as usize])
            ));
        }
        if touch.len() > 1 {
            cons.push(Constraint {
                unit: a / unit,
                a,
                b,
                touch: touch.to_vec(),
                winners,
            });
        }
        Ok(())
    })?;
    let mut stats = RoundStats {
        contested: cons.len() as u64,
        cross_unit_cycle: false,
    };
    // Per atomic unit (constraints come in offset order, so a unit's are consecutive).
    for group in cons.chunk_by(|x, y| x.unit == y.unit) {
        let refs: Vec<&Constraint> = group.iter().collect();
        if let Err(stuck) = serial_order(muts.len(), &refs) {
            let lines: Vec<String> = explain_cycle(muts.len(), &stuck)
                .iter()
                .take(8)
                .map(|c| {
                    format!(
                        "  [{}, {}) touched by {} holds the value of {}",
                        c.a,
                        c.b,
                        names(muts, &c.touch),
                        names(muts, &c.winners)
                    )
                })
                .collect();
            return Err(format!(
                "no serial order of the round's requests explains unit {} (bytes {}..{}):\n{}",
                group[0].unit,
                group[0].unit * unit,
                (group[0].unit + 1) * unit,
                lines.join("\n")
            ));
        }
    }
    let all: Vec<&Constraint> = cons.iter().collect();
    stats.cross_unit_cycle = serial_order(muts.len(), &all).is_err();
    Ok(stats)
}

/// Checks a read of `[off, off + data.len())` issued during a round: each byte holds its value from
/// before the round or that of a request of the round touching it.
pub fn check_read(
    pats: &Patterns,
    prev: &[u8],
    off: u64,
    data: &[u8],
    muts: &[Mutation],
) -> Result<(), String> {
    for_pieces(off, off + data.len() as u64, muts, |a, b, touch| {
        let o = &data[(a - off) as usize..(b - off) as usize];
        let before = &prev[a as usize..b as usize];
        if o == before || touch.iter().any(|&i| muts[i].expect(pats, a, b) == o) {
            return Ok(());
        }
        // A read concurrent with writes may see a mix; each byte must still be explained.
        for (j, &v) in o.iter().enumerate() {
            let at = a + j as u64;
            let ok = v == before[j]
                || touch
                    .iter()
                    .any(|&i| muts[i].expect(pats, at, at + 1)[0] == v);
            if !ok {
                return Err(format!(
                    "the read saw {} at [{a}, {b}) (first wrong byte at {at}); before the round: \
                     {}; requests touching it: {}",
                    describe(pats, a, o),
                    describe(pats, a, before),
                    if touch.is_empty() {
                        "none".to_string()
                    } else {
                        names(muts, touch)
                    }
                ));
            }
        }
        Ok(())
    })
}

/// The model rejects what it must: a lost write, a value moved to another offset, stale data over a
/// contested piece, and a round that no serial order explains within one unit.
#[test]
fn model_catches_wrong_states() {
    let pats = Patterns::get();
    let size = 8192usize;
    let prev = vec![0u8; size];
    let w = |id, a, b| Mutation {
        id,
        ranges: vec![(a, b)],
        zero: false,
        optional: false,
    };
    let put = |v: &mut Vec<u8>, id, a: u64, b: u64| {
        v[a as usize..b as usize].copy_from_slice(&pats.fill(id, a, (b - a) as usize));
    };
    // Two overlapping writes, #1 then #2: fine; #2 then #1: fine too (any serial order).
    let muts = vec![w(1, 0, 3000), w(2, 1000, 5000)];
    let mut ok12 = prev.clone();
    put(&mut ok12, 1, 0, 3000);
    put(&mut ok12, 2, 1000, 5000);
    check_state(pats, &prev, &ok12, &muts, 4096).expect("serial order #1, #2");
    let mut ok21 = prev.clone();
    put(&mut ok21, 2, 1000, 5000);
    put(&mut ok21, 1, 0, 3000);
    check_state(pats, &prev, &ok21, &muts, 4096).expect("serial order #2, #1");
    // Torn within a unit: #1 wins [1000, 2048), #2 wins [2048, 3000) of one 4 KiB unit.
    let mut torn = ok12.clone();
    put(&mut torn, 1, 1000, 2048);
    let e = check_state(pats, &prev, &torn, &muts, 4096).unwrap_err();
    assert!(e.contains("no serial order"), "{e}");
    // The same split at a unit boundary is allowed (with 1 KiB units) but counted.
    let s = check_state(pats, &prev, &torn, &muts, 1024).expect("cross-unit split");
    assert!(s.cross_unit_cycle);
    // A lost write: #2's range still zero.
    let mut lost = prev.clone();
    put(&mut lost, 1, 0, 3000);
    let e = check_state(pats, &prev, &lost, &muts, 4096).unwrap_err();
    assert!(e.contains("zeros"), "{e}");
    // Data moved: #1's data written 512 bytes too far.
    let mut moved = ok12.clone();
    moved[..512].fill(0);
    let shifted = pats.fill(1, 0, 512);
    moved[512..1024].copy_from_slice(&shifted);
    assert!(check_state(pats, &prev, &moved, &muts, 4096).is_err());
    // A change outside every request.
    let mut stray = ok12.clone();
    stray[7000] = 1;
    let e = check_state(pats, &prev, &stray, &muts, 4096).unwrap_err();
    assert!(e.contains("touched by no request"), "{e}");
    // Zeroing requests: several can explain a zero piece.
    let z = |id, a, b| Mutation {
        id,
        ranges: vec![(a, b)],
        zero: true,
        optional: false,
    };
    let muts = vec![w(1, 0, 4096), z(2, 0, 2048), z(3, 1024, 4096)];
    let mut zs = prev.clone();
    put(&mut zs, 1, 0, 4096);
    zs[..4096].fill(0);
    check_state(pats, &prev, &zs, &muts, 4096).expect("zeros explained by #2 and #3");
    // Reads: old, new or a byte mix of them; nothing else.
    let muts = vec![w(1, 0, 3000)];
    let mut mix = pats.fill(1, 0, 1024);
    mix[100..200].fill(0);
    check_read(pats, &prev, 0, &mix, &muts).expect("a mix of old and new");
    let other = pats.fill(2, 0, 1024);
    assert!(check_read(pats, &prev, 0, &other, &muts).is_err());
}
