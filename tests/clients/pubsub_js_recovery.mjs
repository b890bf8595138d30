// Recovery with the browser client, pubsub/static/pubsub.js, from Node with
// the ws package against the server at argv[2] (ws://...), which keeps the
// history of "room:*" (argv[3] says which scenario the server was set up for).
// Prints one JSON object of what it saw as its last line;
// tests/integration/test_pubsub_js.py runs it and checks every field.
//
// Alice is the subscriber whose connection is cut; bob publishes. When this
// prints `CUT /alice`, the test aborts alice's connections from the server's
// side; a cut from alice's side terminates her socket here. Her token
// function is where the script makes her late: a reconnect waits until bob
// has published while she is away, so that every cut misses messages.
import WebSocket from "ws";
import { connect } from "../../pubsub/static/pubsub.js";

const [, , url, scenario] = process.argv;
const WAIT_MS = 30000;
const fast = { minDelay: 20, maxDelay: 200 };
const seen = {};

/** Resolves once `condition()` holds, checked after every change(); fails rather than hangs. */
const waiting = new Set();
function until(condition, what) {
  if (condition()) return Promise.resolve();
  return new Promise((resolve, reject) => {
    const entry = { condition, resolve };
    entry.timer = setTimeout(() => {
      waiting.delete(entry);
      reject(new Error(`not ${what} within ${WAIT_MS} ms`));
    }, WAIT_MS);
    waiting.add(entry);
  });
}
function changed() {
  for (const entry of [...waiting]) {
    if (entry.condition()) {
      waiting.delete(entry);
      clearTimeout(entry.timer);
      entry.resolve();
    }
  }
}

/** The arguments of the next `event` on `client`. */
function next(client, event) {
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`no ${event} within ${WAIT_MS} ms`)), WAIT_MS);
    client.once(event, (...args) => {
      clearTimeout(timer);
      resolve(args);
    });
  });
}

/** ws's WebSocket, remembering each socket so that alice's side can cut it. */
const sockets = [];
class RecordingWebSocket extends WebSocket {
  constructor(...args) {
    super(...args);
    sockets.push(this);

  }
}

let gate = null; // while set, alice's next connection waits for it
const alice = await connect(`${url}alice`, {
  WebSocket: RecordingWebSocket,
  reconnect: fast,
  token: async () => {
    if (gate) await gate;
    return "";
  },
});
const bob = await connect(`${url}bob`, { WebSocket, reconnect: false });
const failures = [];
const resumed = [];
alice.on("recoveryfailed", (detail) => failures.push(detail));
alice.on("resumed", (recovery) => {
  resumed.push(recovery);
  changed();
});

const received = [];
function handler(payload, channel, info) {
  received.push({ payload, channel, position: info.position, recovered: info.recovered });
  changed();
}

/**
 * Cuts alice's connection (from `side`), holds her reconnect until bob has
 * published `away` more, and resolves with her RESUMEs' outcomes.
 */
async function cut(side, publishMeanwhile) {
  let open;
  gate = new Promise((resolve) => (open = resolve));
  const lost = next(alice, "reconnecting");
  const back = next(alice, "open");
  if (side === "server") console.log("CUT /alice");
  else sockets.at(-1).terminate();
  const [detail] = await lost;
  await publishMeanwhile();
  gate = null;
  open();
  await back;
  return detail.code;
}

if (scenario === "recover") {
  const CHANNEL = "room:1";
  seen.first = await alice.resume(CHANNEL, handler);
  // Bob publishes steadily, one every 2 ms or so (each once the last is
  // answered), until alice has been cut off three times.
  let published = 0;
  let stopped = false;
  const pause = () => new Promise((resolve) => setTimeout(resolve, 2));
  const publishing = (async () => {
    while (!stopped) {
      await bob.publish(CHANNEL, String(published));
      published += 1;
      changed();
      await pause();
    }
  })();
  seen.cuts = [];
  for (const [stop, side] of [
    [40, "server"],
    [110, "client"],
    [200, "server"],
  ]) {
    await until(() => received.length >= stop, `${stop} received`);
    const before = resumed.length;
    const code = await cut(side, async () => {
      // Ten published while alice is away, whose replay the RESUME must bring.
      const away = published;
      await until(() => published >= away + 10, "10 published while away");
    });
    await until(() => resumed.length > before, "resumed");
    const recovery = resumed.at(-1);
    seen.cuts.push({
      side,
      code,
      recovered: recovery.recovered,
      replayedAtLeast10: recovery.replayed >= 10,
    });
  }
  stopped = true;
  await publishing;
  seen.published = published;
  await until(() => received.length >= published, `${published} received`);
  // One more, live: nothing was left over from the replays.
  await bob.publish(CHANNEL, "last");
  await until(() => received.length > published, "the last one");
  const [epoch] = new Set(received.map((message) => message.position.epoch));
  seen.payloads = received.map((message) => message.payload);
  seen.offsets = received.map((message) => message.position.offset);
  seen.one_epoch = received.every((message) => message.position.epoch === epoch);
  seen.recovered = received.filter((message) => message.recovered).length;
  seen.replayed = resumed.reduce((sum, recovery) => sum + recovery.replayed, 0);
  seen.last_recovered = received.at(-1).recovered;
  seen.position = alice.position(CHANNEL);
  seen.epoch = epoch;
  seen.failures = failures;
} else if (scenario === "gap") {
  // The server keeps 5 messages per channel; "plain" keeps none.
  const CHANNEL = "room:2";
  seen.first = await alice.resume(CHANNEL, handler);
  seen.plain = await alice.resume("plain", handler);
  await bob.publish(CHANNEL, "before");
  await until(() => received.length === 1, "the first message");
  const { epoch } = received[0].position;
  seen.code = await cut("server", async () => {
    for (let n = 0; n < 20; n++) await bob.publish(CHANNEL, `missed ${n}`);
  });
  await until(() => resumed.length === 2, "both RESUMEs answered");
  seen.failures = failures;
  seen.resumed = resumed;
  await bob.publish(CHANNEL, "live");
  await bob.publish("plain", "live too");
  await until(() => received.length === 3, "the live ones");
  seen.received = received;
  seen.history = await alice.history(CHANNEL, 3);
  seen.history_plain = await alice.history("plain", 3);
  // Another client, resuming from positions kept elsewhere: one still in the
  // history, one trimmed from it.
  const carol = await connect(url, { WebSocket, reconnect: false });
  const carolFailures = [];
  carol.on("recoveryfailed", (detail) => carolFailures.push(detail));
  const carolReceived = [];
  seen.carol_kept = await carol.resume(CHANNEL, (payload) => carolReceived.push(payload), {
    epoch,
    offset: 19,
  });
  seen.carol_trimmed = await carol.resume(CHANNEL, undefined, { epoch, offset: 1 });
  seen.carol_received = carolReceived;
  seen.carol_failures = carolFailures;
  seen.epoch = epoch;
  await carol.close();
} else {
  throw new Error(`no scenario ${scenario}`);
}

await alice.close();
await bob.close();
console.log(JSON.stringify(seen));
