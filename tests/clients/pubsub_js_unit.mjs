// pubsub.js against a scripted WebSocket and mocked timers: the timing rules
// (backoff, keep-alive) and the edge cases a real server rarely produces on
// cue. Run with `node --test`; tests/integration/test_pubsub_js.py runs it.
import assert from "node:assert/strict";
import { afterEach, beforeEach, mock, test } from "node:test";
import { PubSubClient } from "../../pubsub/static/pubsub.js";

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
