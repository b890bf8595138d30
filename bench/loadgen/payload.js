'use strict';
// The benchmark payload, the shared clock and the latency histogram.
//
// Payload (fixed length, ASCII, no JSON escapes):
//   SSSSSSSSSS:TTTTTTTTTTTTTTTT:xxxx...
//   10-digit sequence number (per channel), 16-digit send time in
//   microseconds of CLOCK_MONOTONIC, padding to the payload length.
// CLOCK_MONOTONIC is one clock for every process of the machine, so the
// publisher (one process) and subscribers (others) can subtract times.

const SEQ_DIGITS = 10;
const TS_DIGITS = 16;
const MIN_LENGTH = SEQ_DIGITS + 1 + TS_DIGITS + 1;

function nowUs() {
  const t = process.hrtime();
  return t[0] * 1e6 + Math.floor(t[1] / 1000);
}

function makePayload(seq, ts, length) {
  const head = String(seq).padStart(SEQ_DIGITS, '0') + ':' + String(ts).padStart(TS_DIGITS, '0') + ':';
  return head + 'x'.repeat(length - head.length);
}

function readSeq(buf, off) {
  let v = 0;
  for (let i = off; i < off + SEQ_DIGITS; i++) v = v * 10 + (buf[i] - 48);
  return v;
}

function readTs(buf, off) {
  let v = 0;
  const s = off + SEQ_DIGITS + 1;
  for (let i = s; i < s + TS_DIGITS; i++) v = v * 10 + (buf[i] - 48);
  return v;
}

// Latency histogram in microseconds: exact below 128 us, then buckets 1%
// wide (so a percentile is within 1%), up to about ten minutes.
const LINEAR = 128;
const STEP = Math.log(1.01);
const SIZE = LINEAR + 1700;

class Histogram {
  constructor() {
    this.counts = new Float64Array(SIZE);
    this.n = 0;
    this.max = 0;
    this.sum = 0;
  }

  add(us) {
    if (us < 0) us = 0;
    let i = us < LINEAR ? Math.floor(us) : LINEAR + Math.floor(Math.log(us / LINEAR) / STEP);
    if (i >= SIZE) i = SIZE - 1;
    this.counts[i]++;
    this.n++;
    this.sum += us;
    if (us > this.max) this.max = us;
  }

  toJSON() {
    const sparse = {};
    for (let i = 0; i < SIZE; i++) if (this.counts[i]) sparse[i] = this.counts[i];
    return { sparse, n: this.n, max: this.max, sum: this.sum };
  }

  merge(json) {
    for (const k of Object.keys(json.sparse)) this.counts[+k] += json.sparse[k];
    this.n += json.n;
    this.sum += json.sum;
    if (json.max > this.max) this.max = json.max;
  }

  static value(i) {
    return i < LINEAR ? i + 0.5 : LINEAR * Math.exp((i - LINEAR + 0.5) * STEP);
  }

  percentile(q) {
    if (!this.n) return null;
    const target = q * this.n;
    let seen = 0;
    for (let i = 0; i < SIZE; i++) {
      seen += this.counts[i];
      if (seen >= target && this.counts[i]) return Math.min(Histogram.value(i), this.max);
    }
    return this.max;
  }
}

module.exports = { nowUs, makePayload, readSeq, readTs, Histogram, MIN_LENGTH };
