// Rates and percentiles from successive reads of cumulative counters (the summary's
// per-version statistics, `VersionStats.to_state()`): no state on the server, so any
// number of open pages cost it the same per read.

const VARIANTS = ["stable", "canary", "shadow", "other"];

function add(into, counts) {
  counts.forEach((count, i) => { into[i] = (into[i] || 0) + count; });
  return into;
}

// One version's cumulative totals: requests by variant, failures, rows, runs, queue ns,
// the latency buckets of its successful requests.
export function versionTotals(stats) {
  const byVariant = {};
  let buckets = [];
  for (const [variant, parts] of Object.entries(stats.latency)) {
    const counts = parts[0][0];
    byVariant[variant] = (byVariant[variant] || 0) + counts.reduce((a, b) => a + b, 0);
    buckets = add(buckets, counts);
  }
  let failures = 0;
  for (const [variant, count] of Object.entries(stats.failures)) {
    byVariant[variant] = (byVariant[variant] || 0) + count;
    failures += count;
  }
  const runsBySize = {};
  for (const [size, parts] of Object.entries(stats.batches)) runsBySize[size] = parts[1][0];
  return {
    requests: stats.durations.success[0] + stats.durations.fail[0],
    failures: stats.durations.fail[0],
    byVariant,
    rows: stats.inference_count,
    runs: stats.execution_count,
    queueNs: stats.durations.queue[1],
    buckets,
    runsBySize,
  };
}

export function serverTotals(versions) {
  const total = { requests: 0, failures: 0, buckets: [] };
  for (const version of versions) {
    const t = versionTotals(version.stats);
    total.requests += t.requests;
    total.failures += t.failures;
    total.buckets = add(total.buckets, t.buckets);
  }
  return total;
}

// The difference of two totals (later minus earlier); null before there are two.
export function delta(later, earlier) {
  if (!later || !earlier) return null;
  const out = { seconds: later.time - earlier.time };
  for (const key of ["requests", "failures", "rows", "runs", "queueNs"]) {
    if (key in later) out[key] = later[key] - (earlier[key] || 0);
  }
  out.buckets = later.buckets.map((count, i) => count - (earlier.buckets[i] || 0));
  if (later.byVariant) {
    out.byVariant = {};
    for (const variant of VARIANTS) {
      out.byVariant[variant] = (later.byVariant[variant] || 0) - ((earlier.byVariant || {})[variant] || 0);
    }
  }
  return out;
}

// The q-th percentile (0-100) of bucket counts with upper bounds `bounds` (seconds;
// the last bucket is above them all), interpolated within the bucket, in ms.
export function percentile(buckets, bounds, q) {
  const total = buckets.reduce((a, b) => a + b, 0);
  if (total <= 0) return null;
  const rank = (q / 100) * total;
  let seen = 0;
  for (let i = 0; i < buckets.length; i += 1) {
    if (buckets[i] > 0 && seen + buckets[i] >= rank) {
      const lower = i === 0 ? 0 : bounds[i - 1];
      const upper = i < bounds.length ? bounds[i] : bounds[bounds.length - 1] * 2;
      const within = (rank - seen) / buckets[i];
      return (lower + (upper - lower) * within) * 1000;
    }
    seen += buckets[i];
  }
  return bounds[bounds.length - 1] * 1000;
}

// The snapshot in `history` (oldest first, each with `time`) closest to `seconds` before
// the last one, or the oldest.
export function ago(history, seconds) {
  const last = history[history.length - 1];
  for (let i = history.length - 2; i >= 0; i -= 1) {
    if (last.time - history[i].time >= seconds) return history[i];
  }
  return history.length > 1 ? history[0] : null;
}
