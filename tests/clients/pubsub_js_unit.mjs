// pubsub.js against a scripted WebSocket and mocked timers: the timing rules
// (backoff, keep-alive), recovery frame by frame (RESUME's answers, the
// positions kept, RESUME again on a new connection), and the edge cases a real
// server rarely produces on cue. Run with `node --test`;
// tests/integration/test_pubsub_js.py runs it.
import assert from "node:assert/strict";
import { afterEach, beforeEach, mock, test } from "node:test";
import { NO_POSITION, PubSubClient } from "../../pubsub/static/pubsub.js";

/** A WebSocket whose server side the test plays. */
class FakeSocket {
  static made = [];

  constructor(url, protocols) {
    this.url = url;
    this.protocols = protocols;
    this.sent = [];
    this.closedWith = null;
    FakeSocket.made.push(this);
  }

  send(data) {
    this.sent.push(JSON.parse(data));
  }

  close(code, reason) {
    this.closedWith = [code, reason];
  }

  // The server's side:
  open() {
    this.onopen?.({});
  }

  receive(frame) {
    this.onmessage?.({ data: JSON.stringify(frame) });
  }

  drop(code = 1006, reason = "") {
    this.onclose?.({ code, reason });
  }
}

const settle = () => new Promise((resolve) => setImmediate(resolve));
const last = () => FakeSocket.made[FakeSocket.made.length - 1];

async function opened(options = {}) {
  const client = new PubSubClient("ws://server/", { WebSocket: FakeSocket, ...options });
  await settle();
  last().open();
  return client;
}

beforeEach(() => {
  FakeSocket.made = [];
  mock.timers.enable({ apis: ["setTimeout", "setInterval"] });
});

afterEach(() => {
  mock.timers.reset();
  mock.restoreAll();
});

test("the backoff doubles up to maxDelay, between half and all of it", async () => {
  for (const [random, expected] of [
    [0.999999, [100, 200, 400, 800, 1000, 1000]],
    [0, [50, 100, 200, 400, 500, 500]],
  ]) {
    FakeSocket.made = [];
    mock.method(Math, "random", () => random);
    const client = new PubSubClient("ws://server/", {
      WebSocket: FakeSocket,
      reconnect: { minDelay: 100, maxDelay: 1000 },
    });
    const delays = [];
    client.on("reconnecting", ({ delay }) => delays.push(delay));
    await settle();
    for (let i = 0; i < expected.length; i++) {
      last().drop(1006);
      mock.timers.tick(delays[i]);
      await settle();
    }
    assert.deepEqual(delays, expected);
    assert.equal(FakeSocket.made.length, expected.length + 1);
    client.close();
  }
});

test("an answered keep-alive PING keeps the connection; an unanswered one drops it", async () => {
  const client = await opened({ pingInterval: 1000, reconnect: { minDelay: 10, maxDelay: 10 } });
  const socket = last();
  mock.timers.tick(1000);
  assert.deepEqual(socket.sent, [["PING"]]);
  socket.receive(["pong", ""]);
  await settle();
  mock.timers.tick(1000);
  assert.deepEqual(socket.sent, [["PING"], ["PING"]]);
  assert.equal(socket.closedWith, null);
  const lost = new Promise((resolve) => client.once("reconnecting", resolve));
  mock.timers.tick(1000);
  const detail = await lost;
  assert.equal(detail.code, 4000);
  assert.match(detail.reason, /no answer to PING within 1000 ms/);
  assert.equal(socket.closedWith[0], 4000);
  mock.timers.tick(10);
  await settle();
  assert.equal(FakeSocket.made.length, 2);
  client.close();
});

test("commands wait for the connection, up to maxQueue", async () => {
  const client = new PubSubClient("ws://server/", { WebSocket: FakeSocket, maxQueue: 2 });
  const first = client.ping("one");
  const second = client.publish("news", "two");
  await assert.rejects(client.ping("three"), { code: "QUEUE_FULL" });
  await settle();
  last().open();
  assert.deepEqual(last().sent, [["PING", "one"], ["PUBLISH", "news", "two"]]);
  last().receive(["pong", "one"]);
  last().receive(["reply", 0]);
  assert.equal(await first, "one");
  assert.equal(await second, 0);
  client.close();
});

test("a lost connection sends commands again, but never a publish", async () => {
  const client = await opened({ reconnect: { minDelay: 10, maxDelay: 10 } });
  await settle();
  const subscribing = client.subscribe("news");
  const publishing = client.publish("news", "maybe delivered");
  const pinging = client.ping("again");
  last().drop(1001, "server shutting down");
  await assert.rejects(publishing, { code: "DISCONNECTED" });
  mock.timers.tick(10);
  await settle();
  const socket = last();
  socket.open();
  // The resubscription first, then what was in flight (the publish is not).
  assert.deepEqual(socket.sent, [["SUBSCRIBE", "news"], ["SUBSCRIBE", "news"], ["PING", "again"]]);
  socket.receive(["subscribe", "news", 1]);
  socket.receive(["subscribe", "news", 1]);
  socket.receive(["message", "news", "hi"]);
  socket.receive(["pong", "again"]);
  assert.equal(await subscribing, 1);
  assert.equal(await pinging, "again");
  client.close();
});

test("unsubscribing from everything ends at the PING sent after it", async () => {
  const client = await opened();
  const socket = last();
  const done = client.unsubscribe();
  assert.deepEqual(socket.sent, [["UNSUBSCRIBE"], ["PING"]]);
  socket.receive(["unsubscribe", "a", 1]);
  socket.receive(["unsubscribe", "b", 0]);
  socket.receive(["pong", ""]);
  assert.equal(await done, 0);
  client.close();
});

test("close() is final: nothing reconnects and waiting commands reject", async () => {
  const client = new PubSubClient("ws://server/", {
    WebSocket: FakeSocket,
    reconnect: { minDelay: 10, maxDelay: 10 },
  });
  await settle();
  last().drop(1006);
  const waiting = client.ping();
  const closed = new Promise((resolve) => client.once("closed", resolve));
  client.close();
  assert.deepEqual(await closed, { code: 1000, reason: "closed by the client" });
  await assert.rejects(waiting, { code: "CLOSED" });
  mock.timers.tick(1000);
  await settle();
  assert.equal(FakeSocket.made.length, 1);
  assert.equal(client.state, "closed");
});

test("a token function is called for every connection and sent in the URL", async () => {
  let calls = 0;
  const client = await opened({
    token: () => Promise.resolve(`t${++calls}`),
    reconnect: { minDelay: 10, maxDelay: 10 },
  });
  assert.equal(new URL(last().url).searchParams.get("token"), "t1");
  last().drop(1008, "token expired");
  mock.timers.tick(10);
  await settle();
  assert.equal(new URL(last().url).searchParams.get("token"), "t2");
  assert.equal(client.url, "ws://server/"); // never shown with the token
  client.close();
});

test("a connection lost while subscribing again keeps what is held for the next one", async () => {
  const client = await opened({ reconnect: { minDelay: 10, maxDelay: 10 }, pingInterval: 0 });
  const errors = [];
  client.on("error", (error) => errors.push(error));
  const subscribing = client.subscribe("news");
  last().receive(["subscribe", "news", 1]);
  await subscribing;
  for (let i = 0; i < 2; i++) {
    last().drop(1006);
    mock.timers.tick(10);
    await settle();
    last().open();
    assert.deepEqual(last().sent, [["SUBSCRIBE", "news"]]);
  }
  await settle();
  assert.deepEqual(client.channels, ["news"]);
  assert.deepEqual(errors, []);
  client.close();
});

// -- recovery (docs/protocol.md, Recovery) ----------------------------------------------

const E = "9f2c1a0b";
const at = (offset, epoch = E) => ({ epoch, offset });
const LOST = "messages after the position are no longer kept";

/** A client that resumed `channel`, the channel at `offset`; its handler's calls. */
async function resumedClient(channel = "chat", offset = 41, options = {}) {
  const client = await opened({
    reconnect: { minDelay: 10, maxDelay: 10 },
    pingInterval: 0,
    ...options,
  });
  const got = [];
  const resuming = client.resume(channel, (payload, name, info) => got.push([payload, info]));
  assert.deepEqual(last().sent, [["RESUME", channel]]);
  last().receive(["subscribe", channel, 1]);
  last().receive(["position", channel, at(offset)]);
  const recovery = await resuming;
  assert.deepEqual(recovery, {
    channel,
    recovered: true,
    reason: null,
    position: at(offset),
    replayed: 0,
  });
  return { client, got };
}

/** Drops the connection and opens the next one; what it sent. */
async function reconnect() {
  last().drop(1006);
  mock.timers.tick(10);
  await settle();
  last().open();
  return last().sent;
}

test("resume() subscribes with RESUME and keeps the position of every message", async () => {
  const { client, got } = await resumedClient();
  assert.deepEqual(client.channels, ["chat"]);
  assert.deepEqual(client.position("chat"), at(41));
  last().receive(["message", "chat", "hi", at(42)]);
  last().receive(["message", "chat", { base64: "AP8=" }, at(43)]);
  assert.deepEqual(got, [
    ["hi", { position: at(42), recovered: false }],
    [new Uint8Array([0, 255]), { position: at(43), recovered: false }],
  ]);
  assert.deepEqual(client.position("chat"), at(43));
  assert.equal(client.position("elsewhere"), undefined);
  client.close();
});

test("resume() from a position delivers the replay in order, marked, then resolves", async () => {
  const client = await opened({ pingInterval: 0 });
  const order = [];
  client.on("message", (channel, payload, info) =>
    order.push(["message", payload, info.recovered]),
  );
  const resuming = client.resume("chat", null, { epoch: E, offset: 41 });
  resuming.then(() => order.push(["resolved"]));
  assert.deepEqual(last().sent, [["RESUME", "chat", E, "41"]]);
  last().receive(["subscribe", "chat", 1]);
  last().receive(["message", "chat", "a", at(42)]);
  last().receive(["message", "chat", "b", at(43)]);
  last().receive(["position", "chat", at(43)]);
  last().receive(["message", "chat", "live", at(44)]);
  const recovery = await resuming;
  assert.equal(recovery.replayed, 2);
  assert.deepEqual(recovery.position, at(43));
  assert.deepEqual(order, [
    ["message", "a", true],
    ["message", "b", true],
    ["message", "live", false],
    ["resolved"],
  ]);
  client.close();
});

test("a new connection RESUMEs from the last message, and nothing arrives twice", async () => {
  const { client, got } = await resumedClient();
  const subscribing = [client.subscribe("plain"), client.psubscribe("p*")];
  last().receive(["subscribe", "plain", 2]);
  last().receive(["psubscribe", "p*", 3]);
  await Promise.all(subscribing);
  last().receive(["message", "chat", "42", at(42)]);
  const resumed = [];
  client.on("resumed", (recovery) => resumed.push(recovery));
  const opens = [];
  client.on("open", (detail) => opens.push(detail.resubscribed.channels));
  const sent = await reconnect();
  // The channel resumed from its last message; the others subscribed as before.
  assert.deepEqual(sent, [
    ["SUBSCRIBE", "plain"],
    ["PSUBSCRIBE", "p*"],
    ["RESUME", "chat", E, "42"],
  ]);
  assert.deepEqual(opens, [["chat", "plain"]]);
  last().receive(["subscribe", "plain", 1]);
  last().receive(["psubscribe", "p*", 2]);
  last().receive(["subscribe", "chat", 3]);
  last().receive(["message", "chat", "42", at(42)]); // already had: dropped
  last().receive(["message", "chat", "43", at(43)]);
  last().receive(["message", "chat", "44", at(44)]);
  last().receive(["position", "chat", at(44)]);
  last().receive(["message", "chat", "45", at(45)]);
  last().receive(["message", "plain", "unpositioned"]);
  assert.deepEqual(
    got.map(([payload, info]) => [payload, info.position.offset, info.recovered]),
    [
      ["42", 42, false],
      ["43", 43, true],
      ["44", 44, true],
      ["45", 45, false],
    ],
  );
  assert.deepEqual(resumed, [
    { channel: "chat", recovered: true, reason: null, position: at(44), replayed: 2 },
  ]);
  // The same again: from the last one received.
  assert.deepEqual((await reconnect()).at(-1), ["RESUME", "chat", E, "45"]);
  client.close();
});

test("a resumed channel's messages at or before its position are not delivered again", async () => {
  const { client, got } = await resumedClient();
  last().receive(["message", "chat", "42", at(42)]);
  last().receive(["message", "chat", "43", at(43)]);
  // resume() again, from an earlier position: what crossed it live is not repeated.
  const again = client.resume("chat", undefined, at(41));
  assert.deepEqual(last().sent.at(-1), ["RESUME", "chat", E, "41"]);
  last().receive(["message", "chat", "44", at(44)]);
  last().receive(["subscribe", "chat", 1]);
  for (const offset of [42, 43, 44]) {
    last().receive(["message", "chat", String(offset), at(offset)]);
  }
  last().receive(["position", "chat", at(44)]);
  assert.equal((await again).replayed, 0);
  // A new epoch (the history was lost and began again) is not mistaken for old.
  last().receive(["message", "chat", "new 1", at(1, "other")]);
  assert.deepEqual(
    got.map(([payload]) => payload),
    ["42", "43", "44", "new 1"],
  );
  client.close();
});

test("a connection lost in the middle of a replay resumes from the last one replayed", async () => {
  const client = await opened({ reconnect: { minDelay: 10, maxDelay: 10 }, pingInterval: 0 });
  const got = [];
  const handler = (payload, channel, info) => got.push([payload, info.recovered]);
  const resuming = client.resume("chat", handler, at(40));
  last().receive(["subscribe", "chat", 1]);
  last().receive(["message", "chat", "41", at(41)]);
  const sent = await reconnect();
  // The caller's RESUME goes again, now from what it delivered; no other.
  assert.deepEqual(sent, [["RESUME", "chat", E, "41"]]);
  last().receive(["subscribe", "chat", 1]);
  last().receive(["message", "chat", "42", at(42)]);
  last().receive(["position", "chat", at(42)]);
  const recovery = await resuming;
  assert.deepEqual(recovery, {
    channel: "chat",
    recovered: true,
    reason: null,
    position: at(42),
    replayed: 2,
  });
  assert.deepEqual(got, [
    ["41", true],
    ["42", true],
  ]);
  client.close();
});

test("a resume() made while disconnected is the one RESUME of its channel", async () => {
  const { client } = await resumedClient();
  const subscribing = client.subscribe("news");
  last().receive(["subscribe", "news", 2]);
  await subscribing;
  last().receive(["message", "chat", "42", at(42)]);
  last().drop(1006);
  // Resumed already, and held without RESUME: neither is subscribed otherwise
  // (a SUBSCRIBE first would deliver what the RESUME then replays).
  const again = client.resume("chat");
  const news = client.resume("news");
  mock.timers.tick(10);
  await settle();
  last().open();
  assert.deepEqual(last().sent, [["RESUME", "chat", E, "42"], ["RESUME", "news"]]);
  last().receive(["subscribe", "chat", 1]);
  last().receive(["position", "chat", at(42)]);
  assert.equal((await again).recovered, true);
  // Refused now: the server holds it no more, nor does the client.
  last().receive(["error", "NOPERM no permissions to access the 'news' channel"]);
  await assert.rejects(news, { code: "NOPERM" });
  assert.deepEqual(client.channels, ["chat"]);
  client.close();
});

test("a failed recovery is an event and the answer; live messages follow", async () => {
  const { client, got } = await resumedClient();
  const failures = [];
  const resumed = [];
  client.on("recoveryfailed", (detail) => failures.push(detail));
  client.on("resumed", (recovery) => resumed.push(recovery));
  last().receive(["message", "chat", "42", at(42)]);
  assert.deepEqual(await reconnect(), [["RESUME", "chat", E, "42"]]);
  last().receive(["subscribe", "chat", 1]);
  last().receive(["recovery_failed", "chat", at(190), LOST]);
  last().receive(["message", "chat", "191", at(191)]);
  assert.deepEqual(failures, [{ channel: "chat", reason: LOST, position: at(190) }]);
  assert.deepEqual(resumed, [
    { channel: "chat", recovered: false, reason: LOST, position: at(190), replayed: 0 },
  ]);
  assert.deepEqual(got.map(([payload]) => payload), ["42", "191"]);
  assert.deepEqual(client.position("chat"), at(191));
  // The caller's own RESUME: the answer says so, and the event too.
  const own = client.resume("chat", undefined, at(3, "old"));
  last().receive(["subscribe", "chat", 1]);
  last().receive(["recovery_failed", "chat", at(191), "the channel's history was lost since"]);
  assert.deepEqual(await own, {
    channel: "chat",
    recovered: false,
    reason: "the channel's history was lost since",
    position: at(191),
    replayed: 0,
  });
  assert.equal(failures.length, 2);
  assert.equal(resumed.length, 1); // "resumed" is for the client's own RESUMEs
  client.close();
});

test("a failed recovery nobody listens for is a console warning, never silent", async () => {
  const warned = [];
  mock.method(console, "warn", (...args) => warned.push(args.join(" ")));
  const { client } = await resumedClient();
  await reconnect();
  last().receive(["subscribe", "chat", 1]);
  last().receive(["recovery_failed", "chat", at(190), LOST]);
  assert.deepEqual(warned, [
    `pubsub.js: recovering chat failed, messages may have been missed: ${LOST}`,
  ]);
  client.close();
});

test("a gap in a resumed channel's live messages is told before the message after it", async () => {
  const { client } = await resumedClient();
  const seen = [];
  client.on("recoveryfailed", (detail) => seen.push(["failed", detail]));
  client.on("message", (channel, payload) => seen.push(["message", payload]));
  const live = (payload, position) => last().receive(["message", "chat", payload, position]);
  live("42", at(42));
  live("46", at(46)); // 43 to 45 were lost on the server's side
  live("47", at(47));
  live("new 1", at(1, "other")); // a new epoch starts at 1: nothing missed
  live("new 3", at(3, "other"));
  const failed = (reason, position) => ["failed", { channel: "chat", reason, position }];
  assert.deepEqual(seen, [
    ["message", "42"],
    failed("messages 43 to 45 of epoch 9f2c1a0b never arrived", at(46)),
    ["message", "46"],
    ["message", "47"],
    ["message", "new 1"],
    failed("message 2 of epoch other never arrived", at(3, "other")),
    ["message", "new 3"],
  ]);
  // A replay starts where the caller asked, which its answer judges: no gap.
  seen.length = 0;
  const ahead = client.resume("chat", undefined, at(9, "other"));
  last().receive(["subscribe", "chat", 1]);
  live("new 10", at(10, "other"));
  last().receive(["position", "chat", at(10, "other")]);
  assert.equal((await ahead).recovered, true);
  live("new 11", at(11, "other"));
  assert.deepEqual(seen, [
    ["message", "new 10"],
    ["message", "new 11"],
  ]);
  client.close();
});

test("with no position to resume from, a new connection cannot recover: it says why", async () => {
  // A channel that keeps no history.
  const other = await opened({ reconnect: { minDelay: 10, maxDelay: 10 }, pingInterval: 0 });
  const failures = [];
  other.on("recoveryfailed", (detail) => failures.push(detail));
  const resuming = other.resume("plain");
  last().receive(["subscribe", "plain", 1]);
  last().receive(["position", "plain", null]);
  assert.deepEqual(await resuming, {
    channel: "plain",
    recovered: true,
    reason: null,
    position: null,
    replayed: 0,
  });
  assert.equal(other.position("plain"), null);
  assert.deepEqual(await reconnect(), [["RESUME", "plain"]]);
  last().receive(["subscribe", "plain", 1]);
  last().receive(["position", "plain", null]);
  // A connection lost between the confirmation and the position.
  const lost = other.resume("gap");
  last().receive(["subscribe", "gap", 2]);
  assert.deepEqual(await reconnect(), [["RESUME", "plain"], ["RESUME", "gap"]]);
  last().receive(["subscribe", "plain", 1]);
  last().receive(["position", "plain", null]);
  last().receive(["subscribe", "gap", 2]);
  last().receive(["position", "gap", at(7)]);
  assert.deepEqual(failures, [
    { channel: "plain", reason: "the channel keeps no history", position: null },
    { channel: "plain", reason: "the channel keeps no history", position: null },
    { channel: "gap", reason: NO_POSITION, position: at(7) },
  ]);
  // The caller's own RESUME of "gap" went again, and its answer says so too.
  assert.equal((await lost).recovered, false);
  other.close();
});

test("unsubscribing forgets the position, and a RESUME on its way", async () => {
  const { client } = await resumedClient();
  last().receive(["message", "chat", "42", at(42)]);
  client.unsubscribe("chat");
  last().receive(["unsubscribe", "chat", 0]);
  assert.equal(client.position("chat"), undefined);
  // Unsubscribed, and subscribed again without RESUME, before its answer came.
  const resuming = client.resume("later");
  client.unsubscribe("later");
  const plain = client.subscribe("later");
  last().receive(["subscribe", "later", 1]);
  last().receive(["position", "later", at(3)]);
  last().receive(["unsubscribe", "later", 0]);
  last().receive(["subscribe", "later", 1]);
  await Promise.all([resuming, plain]);
  assert.equal(client.position("later"), undefined);
  last().receive(["message", "later", "x", at(4)]);
  assert.equal(client.position("later"), undefined);
  assert.deepEqual(await reconnect(), [["SUBSCRIBE", "later"]]);
  client.close();
});

test("a refused resume() is not held; one refused after reconnecting is forgotten", async () => {
  const client = await opened({ reconnect: { minDelay: 10, maxDelay: 10 }, pingInterval: 0 });
  const handler = () => {};
  const refused = client.resume("secret", handler);
  last().receive(["error", "NOPERM no permissions to access the 'secret' channel"]);
  await assert.rejects(refused, { code: "NOPERM" });
  assert.deepEqual(client.channels, []);
  assert.equal(client.on("message:secret", handler)(), undefined);
  const resuming = client.resume("chat");
  last().receive(["subscribe", "chat", 1]);
  last().receive(["position", "chat", at(1)]);
  await resuming;
  const errors = [];
  client.on("error", (error) => errors.push(error.code));
  assert.deepEqual(await reconnect(), [["RESUME", "chat", E, "1"]]);
  last().receive(["error", "NOPERM no permissions to access the 'chat' channel"]);
  await settle();
  assert.deepEqual(errors, ["NOPERM"]);
  assert.deepEqual(client.channels, []);
  assert.equal(client.position("chat"), undefined);
  assert.deepEqual(await reconnect(), []);
  client.close();
});

test("history() reads what the channel keeps, with positions", async () => {
  const client = await opened({ pingInterval: 0 });
  const kept = client.history("chat", 2);
  assert.deepEqual(last().sent, [["HISTORY", "chat", "2"]]);
  last().receive(["history", "chat", at(44), [[43, "are you there?"], [44, { base64: "AP8=" }]]]);
  assert.deepEqual(await kept, {
    channel: "chat",
    position: at(44),
    messages: [
      { payload: "are you there?", position: at(43) },
      { payload: new Uint8Array([0, 255]), position: at(44) },
    ],
  });
  const none = client.history("plain", 5);
  last().receive(["history", "plain", null, []]);
  assert.deepEqual(await none, { channel: "plain", position: null, messages: [] });
  const bad = client.history("chat", 1);
  last().receive(["history", "chat", { epoch: E }, []]);
  await assert.rejects(bad, { code: "PROTOCOL" });
  assert.throws(() => client.history("chat", -1), TypeError);
  assert.throws(() => client.history("chat", "3"), TypeError);
  client.close();
});

test("bad positions: the caller's refused before sending, the server's as PROTOCOL", async () => {
  const client = await opened({ pingInterval: 0 });
  for (const position of [{ epoch: E }, { epoch: 1, offset: 1 }, at(-1), at(1.5), "E:1"]) {
    assert.throws(() => client.resume("chat", undefined, position), TypeError);
  }
  assert.throws(() => client.resume("chat", "not a function"), TypeError);
  assert.deepEqual(last().sent, []);
  assert.deepEqual(client.channels, []);
  const errors = [];
  client.on("error", (error) => errors.push(error.code));
  const resuming = client.resume("chat");
  last().receive(["position", "chat", at(1)]); // before the confirmation
  await assert.rejects(resuming, { code: "PROTOCOL" });
  const again = client.resume("chat");
  last().receive(["subscribe", "chat", 1]);
  last().receive(["position", "chat", { epoch: E, offset: "1" }]);
  await assert.rejects(again, { code: "PROTOCOL" });
  last().receive(["message", "chat", "x", { epoch: E, offset: -1 }]);
  assert.deepEqual(errors, ["PROTOCOL"]);
  client.close();
});

test("listeners of channels not resumed get what they always got", async () => {
  const client = await opened({ pingInterval: 0 });
  const got = [];
  client.subscribe("news", (...args) => got.push(args));
  client.on("message", (...args) => got.push(args));
  last().receive(["subscribe", "news", 1]);
  last().receive(["message", "news", "hi"]);
  assert.deepEqual(got, [
    ["news", "hi"],
    ["hi", "news"],
  ]);
  // A channel resumed: its messages come with what they are, from the moment
  // resume() is called; without history, they say they have no position.
  const resuming = client.resume("news");
  last().receive(["message", "news", "before the answer"]);
  assert.deepEqual(got.slice(2), [
    ["news", "before the answer", { position: null, recovered: false }],
    ["before the answer", "news", { position: null, recovered: false }],
  ]);
  last().receive(["subscribe", "news", 1]);
  last().receive(["position", "news", null]);
  await resuming;
  got.length = 0;
  const resumingPlain = client.resume("plain", (...args) => got.push(args));
  last().receive(["subscribe", "plain", 2]);
  last().receive(["position", "plain", null]);
  await resumingPlain;
  last().receive(["message", "plain", "x"]);
  assert.deepEqual(got, [
    ["plain", "x", { position: null, recovered: false }],
    ["x", "plain", { position: null, recovered: false }],
  ]);
  client.close();
});

test("close() while subscribing again is no error, and keeps what was held", async () => {
  const { client } = await resumedClient();
  const subscribing = client.subscribe("news");
  last().receive(["subscribe", "news", 2]);
  await subscribing;
  const errors = [];
  client.on("error", (error) => errors.push(error));
  await reconnect();
  client.close();
  await settle();
  assert.deepEqual(errors, []);
  assert.deepEqual(client.channels, ["chat", "news"]);
});
