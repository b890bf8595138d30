'use strict';
// One benchmark run against one server: `node coordinator.js '<json config>'`.
//
// This process publishes; subscribers live in worker processes (worker.js),
// split evenly, so no single process has to read every delivery.  It reads
// the server's CPU time (utime+stime in /proc/PID/stat) and RSS around the
// measured window, and its own and the workers' CPU time over the same
// window, so the report shows whether the load generator could have been
// the bottleneck.  The result is one JSON line on stdout; logs go to stderr.
//
// Publishing modes:
//   pipelined  as fast as the server takes them, with two bounds: at most
//              `pipeline` PUBLISH replies outstanding, and at most `window`
//              deliveries published but not yet received by the subscribers
//              (end-to-end flow control, so neither server ever queues more
//              than `window` deliveries' worth and no output buffer limit is
//              reached because the load generator lagged).
//   rate       `rate` publishes per second on a fixed schedule.
//
// Optional, for servers of more than one process (the backplane scenario):
//   publishPort  where the publisher connects [default: `port`, the subscribers']
//   otherPids    {name: pid}: processes whose CPU time is read around the
//                window, in ns from schedstat, reported as `cpu_ns_<name>`
//   settleMs     a pause after the subscribers are set up, before publishing;
//                the otherPids' CPU over it is reported as `idle_ns_<name>`
//
// Optional, for a server that keeps a history (docs/protocol.md, Recovery):
//   resume       true: the fanout and channels subscribers send
//                ["RESUME", channel] (one per channel) instead of SUBSCRIBE,
//                and are set up once the `position` frame came too; their
//                messages carry a position, counted as `positioned`

const { fork } = require('child_process');
const path = require('path');
const { connClass } = require('./conn');
const { nowUs, makePayload, Histogram, MIN_LENGTH } = require('./payload');
const { cpuTicks, cpuNs, rssKb, listenDrops } = require('./proc');

const cfg = JSON.parse(process.argv[2]);
const Conn = connClass(cfg.server);
const L = cfg.payloadLength;
if (L < MIN_LENGTH) throw new Error(`payloadLength must be at least ${MIN_LENGTH}`);

function log(...args) {
  process.stderr.write(`[loadgen ${cfg.server} ${cfg.name}] ${args.join(' ')}\n`);
}

function sleep(ms) {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

// Bounds every wait: a run that hangs is reported, never waited on forever.
function within(promise, ms, what) {
  let timer;
  return Promise.race([
    promise,
    new Promise((_, reject) => {
      timer = setTimeout(() => reject(new Error(`timed out after ${ms} ms: ${what}`)), ms);
    }),
  ]).finally(() => clearTimeout(timer));
}

// ------------------------------------------------------------- scenarios

// Subscriber specs, the channels publishes go to (round robin), and how many
// deliveries each publish makes.
function plan() {
  const s = cfg.scenario;
  if (cfg.resume && cfg.server === 'redis') throw new Error('Redis has no RESUME');
  const subscribe = cfg.resume ? 'RESUME' : 'SUBSCRIBE';
  if (s === 'fanout') {
    const subs = [];
    for (let i = 0; i < cfg.subscribers; i++) subs.push({ cmd: subscribe, names: ['fanout'] });
    return { subs, channels: ['fanout'], perPublish: cfg.subscribers };
  }
  if (s === 'channels' || s === 'idle') {
    const prefix = s === 'idle' ? 'idle.' : 'ch.';
    const subs = [];
    const channels = [];
    for (let i = 0; i < cfg.subscribers; i++) {
      subs.push({ cmd: s === 'idle' ? 'SUBSCRIBE' : subscribe, names: [prefix + i] });
      channels.push(prefix + i);
    }
    return { subs, channels, perPublish: 1 };
  }
  if (s === 'patterns' || s === 'nopatterns') {
    // `groups` receivers; receiver g gets the publishes to bench.p<g>.x,
    // through one of its patterns (bench.p<i>.* for i = g mod groups) or,
    // without patterns, through a plain subscription to that channel.
    const groups = cfg.groups;
    const subs = [];
    const channels = [];
    for (let g = 0; g < groups; g++) {
      channels.push(`bench.p${g}.x`);
      if (s === 'patterns') {
        const names = [];
        for (let i = g; i < cfg.patterns; i += groups) names.push(`bench.p${i}.*`);
        subs.push({ cmd: 'PSUBSCRIBE', names });
      } else subs.push({ cmd: 'SUBSCRIBE', names: [`bench.p${g}.x`] });
    }
    return { subs, channels, perPublish: 1 };
  }
  throw new Error('unknown scenario ' + s);
}

// ---------------------------------------------------------------- workers

class Workers {
  constructor(count) {
    this.procs = [];
    this.received = [];
    this.lastRecv = [];
    this.waiters = [];
    this.onProgress = null;
    for (let i = 0; i < count; i++) {
      const child = fork(path.join(__dirname, 'worker.js'), [], { stdio: ['ignore', 'inherit', 'inherit', 'ipc'] });
      this.procs.push(child);
      this.received.push(0);
      this.lastRecv.push(0);
      child.on('message', (msg) => this._message(i, msg));
      child.on('exit', (code) => {
        if (!this.exiting) log(`worker ${i} exited with ${code}`);
      });
    }
  }

  _message(i, msg) {
    if (msg.type === 'progress') {
      this.received[i] = msg.received;
      this.lastRecv[i] = msg.lastRecvUs;
      if (this.onProgress) this.onProgress();
      return;
    }
    const waiter = this.waiters.find((w) => w.worker === i && w.type === msg.type);
    if (waiter) {
      this.waiters.splice(this.waiters.indexOf(waiter), 1);
      waiter.resolve(msg);
    }
  }

  expect(i, type) {
    return new Promise((resolve) => this.waiters.push({ worker: i, type, resolve }));
  }

  // Sends messages[i] to worker i and waits for every answer of `type`.
  ask(messages, type, ms) {
    const answers = this.procs.map((_, i) => this.expect(i, type));
    this.procs.forEach((p, i) => p.send(messages[i]));
    return within(Promise.all(answers), ms, `workers' ${type}`);
  }

  askAll(message, type, ms) {
    return this.ask(this.procs.map(() => message), type, ms);
  }

  totalReceived() {
    let n = 0;
    for (const r of this.received) n += r;
    return n;
  }

  pids() {
    return this.procs.map((p) => p.pid);
  }

  kill() {
    this.exiting = true;
    for (const p of this.procs) {
      try {
        p.kill('SIGKILL');
      } catch (_) {
        /* already gone */
      }
    }
  }
}

async function openSubscribers(workers, subs) {
  const shares = workers.procs.map(() => []);
  subs.forEach((s, i) => shares[i % shares.length].push(s));
  const messages = shares.map((share) => ({
    type: 'setup',
    server: cfg.server,
    port: cfg.port,
    payloadLength: L,
    subs: share,
    concurrency: Math.max(1, Math.floor(cfg.connectConcurrency / shares.length)),
    timeoutMs: cfg.setupTimeoutS * 1000,
  }));
  const answers = await workers.ask(messages, 'ready', cfg.setupTimeoutS * 1000 + 5000);
  const connected = answers.reduce((n, a) => n + a.connected, 0);
  const failed = answers.reduce((n, a) => n + Math.max(0, a.failed), 0);
  return { connected, failed, t1: Math.max(...answers.map((a) => a.t1 || 0)) };
}

// ------------------------------------------------------------- publisher

class Publisher {
  constructor(channels, perPublish) {
    this.channels = channels;
    this.seq = new Array(channels.length).fill(0);
    this.perPublish = perPublish;
    this.sent = 0; // publishes written
    this.replies = 0;
    this.replySum = 0;
    this.errors = [];
    this.next = 0; // round-robin index into channels
    this.onReply = null;
  }

  async connect() {
    const handler = {
      onMessage: () => this.errors.push('publisher received a message'),
      onReply: (n) => {
        this.replies++;
        this.replySum += n;
        if (this.onReply) this.onReply();
      },
      onError: (text) => {
        if (this.errors.length < 10) this.errors.push(text);
      },
      onClose: () => this.errors.push('publisher connection closed'),
    };
    this.conn = await new Conn(cfg.publishPort || cfg.port, handler, L).connect();
  }

  // The next PUBLISH frame, stamped `ts`.
  build(ts) {
    const k = this.next;
    this.next = k + 1 === this.channels.length ? 0 : k + 1;
    const payload = makePayload(this.seq[k]++, ts, L);
    this.sent++;
    return Conn.command(['PUBLISH', this.channels[k], payload]);
  }

  expectedDeliveries() {
    return this.sent * this.perPublish;
  }
}

// As fast as the server takes them, within the pipeline and window bounds.
function pipelined(pub, workers, seconds, maxPublishes) {
  return new Promise((resolve) => {
    const first = pub.sent;
    let stopped = false;
    let scheduled = false;
    const finish = () => {
      if (stopped) return;
      stopped = true;
      clearTimeout(timer);
      pub.onReply = null;
      workers.onProgress = null;
      resolve(pub.sent - first);
    };
    const timer = setTimeout(finish, seconds * 1000);
    const pump = () => {
      scheduled = false;
      if (stopped) return;
      const batch = [];
      const ts = nowUs();
      const received = workers.totalReceived();
      while (
        pub.sent - pub.replies < cfg.pipeline &&
        pub.expectedDeliveries() - received < cfg.window &&
        pub.sent - first < maxPublishes
      ) {
        batch.push(pub.build(ts));
      }
      if (batch.length) pub.conn.write(batch.length === 1 ? batch[0] : Buffer.concat(batch));
      if (pub.sent - first >= maxPublishes) finish();
    };
    const schedule = () => {
      if (!scheduled) {
        scheduled = true;
        setImmediate(pump);
      }
    };
    pub.onReply = schedule;
    workers.onProgress = schedule;
    pump();
  });
}

// `rate` publishes a second on a fixed schedule, for `seconds`.
function fixedRate(pub, rate, seconds) {
  return new Promise((resolve) => {
    const count = Math.max(1, Math.round(rate * seconds));
    const start = nowUs();
    let i = 0;
    const tick = () => {
      // Catch up without bursting more than a few at once after a stall.
      let burst = 0;
      while (i < count && nowUs() >= start + (i * 1e6) / rate && burst < 4) {
        pub.conn.write(pub.build(nowUs()));
        i++;
        burst++;
      }
      if (i >= count) {
        resolve(count);
        return;
      }
      const wait = (start + (i * 1e6) / rate - nowUs()) / 1000;
      setTimeout(tick, Math.max(0, wait));
    };
    tick();
  });
}

// Waits until every delivery published so far has arrived (and every reply).
async function drain(pub, workers, seconds) {
  const limit = nowUs() + seconds * 1e6;
  while (nowUs() < limit) {
    if (workers.totalReceived() >= pub.expectedDeliveries() && pub.replies >= pub.sent) return true;
    await sleep(2);
  }
  return false;
}

function cpuSnapshot(pids) {
  return pids.map((pid) => {
    try {
      return cpuTicks(pid);
    } catch (_) {
      return NaN;
    }
  });
}

function loadgenCpu(before, after, wallUs) {
  const us = after.map((a, i) => ((a - before[i]) * 1e6) / cfg.clkTck);
  const total = us.reduce((x, y) => x + y, 0);
  return {
    loadgen_cores: total / wallUs,
    loadgen_max_process_pct: (100 * Math.max(...us)) / wallUs,
    loadgen_processes: us.length,
  };
}

// -------------------------------------------------------------- the runs

async function publishingRun(workers) {
  const p = plan();
  const setup = await openSubscribers(workers, p.subs);
  if (setup.failed) throw new Error(`${setup.failed} subscribers could not connect and subscribe`);
  for (const child of workers.procs) child.send({ type: 'progress-every', ms: cfg.progressMs });
  const others = Object.entries(cfg.otherPids || {});
  const idle = {};
  if (cfg.settleMs) {
    const before = others.map(([, pid]) => cpuNs(pid));
    const s0 = nowUs();
    await sleep(cfg.settleMs);
    const s = (nowUs() - s0) / 1e6;
    others.forEach(([name, pid], i) => (idle[`idle_ns_per_s_${name}`] = (cpuNs(pid) - before[i]) / s));
  }
  const pub = new Publisher(p.channels, p.perPublish);
  await pub.connect();

  const phase = () =>
    cfg.mode === 'rate'
      ? fixedRate(pub, cfg.rate, cfg.durationS)
      : pipelined(pub, workers, cfg.durationS, cfg.maxPublishes);

  // Warm-up: the same traffic, briefly, not measured.
  if (cfg.warmupS > 0) {
    if (cfg.mode === 'rate') await fixedRate(pub, cfg.rate, cfg.warmupS);
    else await pipelined(pub, workers, cfg.warmupS, cfg.maxPublishes);
    await drain(pub, workers, cfg.drainTimeoutS);
  }
  await workers.askAll({ type: 'reset' }, 'reset-ok', 10000);

  const pids = [process.pid, ...workers.pids()];
  log('measure start');
  const server0 = cpuTicks(cfg.serverPid);
  const others0 = others.map(([, pid]) => cpuNs(pid));
  const lg0 = cpuSnapshot(pids);
  const t0 = nowUs();
  const published = await phase();
  const drained = await drain(pub, workers, cfg.drainTimeoutS);
  const t1 = nowUs();
  const server1 = cpuTicks(cfg.serverPid);
  const others1 = others.map(([, pid]) => cpuNs(pid));
  const lg1 = cpuSnapshot(pids);
  const rss = rssKb(cfg.serverPid);

  const reports = await workers.askAll({ type: 'report' }, 'report', 20000);
  const hist = new Histogram();
  let phaseReceived = 0, totalReceived = 0, gaps = 0, disorder = 0, closes = 0, errorCount = 0;
  let positioned = 0;
  let lastRecv = 0;
  const errors = [...pub.errors];
  for (const r of reports) {
    hist.merge(r.hist);
    phaseReceived += r.phaseReceived;
    positioned += r.phasePositioned;
    totalReceived += r.totalReceived;
    gaps += r.gaps;
    disorder += r.disorder;
    closes += r.closes;
    errorCount += r.errorCount;
    errors.push(...r.errors);
    lastRecv = Math.max(lastRecv, r.lastRecvUs);
  }
  const wall = t1 - t0;
  const serverUs = ((server1 - server0) * 1e6) / cfg.clkTck;
  const expectedTotal = pub.expectedDeliveries();
  return {
    subscribers: setup.connected,
    published,
    deliveries: phaseReceived,
    positioned,
    drained,
    window_s: wall / 1e6,
    deliveries_per_s: phaseReceived / ((Math.max(lastRecv, t0 + 1) - t0) / 1e6),
    publishes_per_s: published / ((Math.max(lastRecv, t0 + 1) - t0) / 1e6),
    latency_p50_us: hist.percentile(0.5),
    latency_p99_us: hist.percentile(0.99),
    latency_max_us: hist.max,
    lost: expectedTotal - totalReceived,
    expected_total: expectedTotal,
    received_total: totalReceived,
    reply_sum_mismatch: pub.replySum - expectedTotal,
    gaps,
    disorder,
    closes,
    errors: errorCount + pub.errors.length,
    error_samples: errors.slice(0, 5),
    server_cpu_us: serverUs,
    server_cpu_pct: (100 * serverUs) / wall,
    server_us_per_delivery: phaseReceived ? serverUs / phaseReceived : null,
    server_us_per_publish: published ? serverUs / published : null,
    server_rss_kb: rss,
    ...loadgenCpu(lg0, lg1, wall),
    ...Object.fromEntries(others.map(([name], i) => [`cpu_ns_${name}`, others1[i] - others0[i]])),
    ...idle,
  };
}

async function idleRun(workers) {
  const p = plan();
  // Warm-up: a few connections come and go, so first-use costs (imports,
  // allocator arenas) are not charged to the measured connections.
  const warm = Math.min(cfg.warmupConnections, p.subs.length);
  if (warm) {
    const w = plan();
    w.subs = w.subs.slice(0, warm).map((s) => ({ cmd: s.cmd, names: s.names.map((n) => 'warm.' + n) }));
    await openSubscribers(workers, w.subs);
    await workers.askAll({ type: 'close' }, 'closed', 20000);
    await sleep(cfg.settleMs);
  }
  const pids = [process.pid, ...workers.pids()];
  log('measure start');
  const rss0 = rssKb(cfg.serverPid);
  const drops0 = listenDrops();
  const server0 = cpuTicks(cfg.serverPid);
  const lg0 = cpuSnapshot(pids);
  const t0 = nowUs();
  const setup = await openSubscribers(workers, p.subs);
  const t1 = nowUs();
  const server1 = cpuTicks(cfg.serverPid);
  const lg1 = cpuSnapshot(pids);
  const drops1 = listenDrops();
  await sleep(cfg.settleMs);
  const rss1 = rssKb(cfg.serverPid);
  const reports = await workers.askAll({ type: 'report' }, 'report', 20000);
  const errors = reports.flatMap((r) => r.errors);
  const serverUs = ((server1 - server0) * 1e6) / cfg.clkTck;
  return {
    connections: setup.connected,
    failed: setup.failed,
    connect_s: (t1 - t0) / 1e6,
    connects_per_s: setup.connected / ((t1 - t0) / 1e6),
    server_rss_before_kb: rss0,
    server_rss_after_kb: rss1,
    bytes_per_connection: setup.connected ? ((rss1 - rss0) * 1024) / setup.connected : null,
    server_cpu_us: serverUs,
    server_cpu_pct: (100 * serverUs) / (t1 - t0),
    server_us_per_connect: setup.connected ? serverUs / setup.connected : null,
    listen_drops: drops1 - drops0,
    closes: reports.reduce((n, r) => n + r.closes, 0),
    errors: reports.reduce((n, r) => n + r.errorCount, 0),
    error_samples: errors.slice(0, 5),
    ...loadgenCpu(lg0, lg1, t1 - t0),
  };
}

async function main() {
  const hardStop = setTimeout(() => {
    process.stdout.write(JSON.stringify({ error: `run exceeded ${cfg.maxRunS} s` }) + '\n');
    process.exit(3);
  }, cfg.maxRunS * 1000);
  const workers = new Workers(cfg.workers);
  let result;
  try {
    result = cfg.scenario === 'idle' ? await idleRun(workers) : await publishingRun(workers);
  } catch (err) {
    result = { error: err.message };
    log(err.stack);
  }
  workers.kill();
  clearTimeout(hardStop);
  process.stdout.write(JSON.stringify(result) + '\n');
  process.exit(result.error ? 2 : 0);
}

main();
