'use strict';
// A subscriber process of the load generator, driven by coordinator.js over
// the IPC channel.  It holds its share of the subscriber connections, checks
// every message's sequence number (gaps and disorder), records its latency,
// and reports its running total every few milliseconds so the coordinator
// can keep the publisher a bounded distance ahead of the slowest process.

const { connClass } = require('./conn');
const { nowUs, readSeq, readTs, Histogram } = require('./payload');

const state = {
  conns: [],
  hist: new Histogram(),
  phaseReceived: 0,
  totalReceived: 0,
  phasePositioned: 0, // of phaseReceived, messages that carried their position
  gaps: 0, // messages skipped over (a later sequence number came first)
  disorder: 0, // messages older than one already seen
  errors: [],
  errorCount: 0,
  closes: 0,
  lastRecvUs: 0,
  reported: -1,
};

function noteError(text) {
  state.errorCount++;
  if (state.errors.length < 10) state.errors.push(String(text).slice(0, 200));
}

// Set up once every confirmation came, and every `position` frame (RESUME
// answers with both: ["subscribe",ch,1] then ["position",ch,{...}]).
class Subscriber {
  constructor(expectConfirms, expectPositions) {
    this.next = 0;
    this.confirms = 0;
    this.positions = 0;
    this.expectConfirms = expectConfirms;
    this.expectPositions = expectPositions;
    this.onConfirmed = null;
  }

  onMessage(buf, off, positioned) {
    const now = nowUs();
    const seq = readSeq(buf, off);
    if (seq !== this.next) {
      if (seq > this.next) state.gaps += seq - this.next;
      else state.disorder++;
    }
    if (seq >= this.next) this.next = seq + 1;
    state.hist.add(now - readTs(buf, off));
    state.phaseReceived++;
    state.totalReceived++;
    if (positioned) state.phasePositioned++;
    state.lastRecvUs = now;
  }

  onConfirm() {
    this.confirms++;
    this._check();
  }

  onPosition() {
    this.positions++;
    this._check();
  }

  _check() {
    if (
      this.confirms >= this.expectConfirms &&
      this.positions >= this.expectPositions &&
      this.onConfirmed
    ) {
      const done = this.onConfirmed;
      this.onConfirmed = null;
      done();
    }
  }

  onError(text) {
    noteError(text);
  }

  onClose() {
    state.closes++;
  }
}

// Opens every subscriber, at most `concurrency` handshakes at a time.  One
// watchdog bounds the whole setup (no timer per connection: connecting is
// what this process spends its time on in the idle scenario).
async function setup(msg) {
  const Conn = connClass(msg.server);
  const specs = msg.subs;
  let index = 0;
  let failed = 0;
  let expired = false;
  const pending = new Set();
  const t0 = nowUs();
  const watchdog = setTimeout(() => {
    expired = true;
    for (const fail of pending) fail(new Error(`setup timeout (${msg.timeoutMs} ms)`));
  }, msg.timeoutMs);
  function one(spec) {
    return new Promise((resolve, reject) => {
      const resume = spec.cmd === 'RESUME';
      const sub = new Subscriber(spec.names.length, resume ? spec.names.length : 0);
      const conn = new Conn(msg.port, sub, msg.payloadLength);
      const done = (err) => {
        pending.delete(done);
        if (err) {
          conn.destroy();
          reject(err);
        } else resolve();
      };
      pending.add(done);
      sub.onConfirmed = () => done(null);
      conn.connect().then(() => {
        state.conns.push(conn);
        // RESUME takes one channel: one command per name.
        if (resume) conn.write(Buffer.concat(spec.names.map((n) => Conn.command([spec.cmd, n]))));
        else conn.write(Conn.command([spec.cmd, ...spec.names]));
      }, done);
    });
  }
  async function lane() {
    while (index < specs.length && !expired) {
      const spec = specs[index++];
      try {
        await one(spec);
      } catch (err) {
        failed++;
        noteError('setup: ' + err.message);
      }
    }
  }
  const lanes = [];
  for (let i = 0; i < Math.min(msg.concurrency, specs.length); i++) lanes.push(lane());
  await Promise.all(lanes);
  clearTimeout(watchdog);
  process.send({
    type: 'ready',
    connected: state.conns.length,
    failed: failed + (specs.length - index),
    t0,
    t1: nowUs(),
  });
}

function progress() {
  if (state.totalReceived !== state.reported) {
    state.reported = state.totalReceived;
    process.send({ type: 'progress', received: state.totalReceived, lastRecvUs: state.lastRecvUs });
  }
}

process.on('message', (msg) => {
  if (msg.type === 'setup') {
    setup(msg).catch((err) => {
      noteError(err.stack);
      process.send({ type: 'ready', connected: state.conns.length, failed: -1 });
    });
  } else if (msg.type === 'progress-every') {
    setInterval(progress, msg.ms).unref();
  } else if (msg.type === 'reset') {
    state.hist = new Histogram();
    state.phaseReceived = 0;
    state.phasePositioned = 0;
    process.send({ type: 'reset-ok' });
  } else if (msg.type === 'report') {
    process.send({
      type: 'report',
      hist: state.hist.toJSON(),
      phaseReceived: state.phaseReceived,
      phasePositioned: state.phasePositioned,
      totalReceived: state.totalReceived,
      gaps: state.gaps,
      disorder: state.disorder,
      errorCount: state.errorCount,
      errors: state.errors,
      closes: state.closes,
      lastRecvUs: state.lastRecvUs,
    });
  } else if (msg.type === 'close') {
    for (const c of state.conns) c.destroy();
    state.conns = [];
    process.send({ type: 'closed' });
  } else if (msg.type === 'exit') {
    process.exit(0);
  }
});

process.on('disconnect', () => process.exit(0));
