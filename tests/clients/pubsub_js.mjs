// Drives the browser client, pubsub/static/pubsub.js, from Node with the ws
// package against the server at argv[2] (ws://...), as an application would,
// and prints one JSON object of what it saw as its last line.
// tests/integration/test_pubsub_js.py runs it and checks every field. When it
// prints the line DROP, the test drops every connection from the server side.
import WebSocket from "ws";
import { PubSubClient, PubSubError, connect } from "../../pubsub/static/pubsub.js";

const url = process.argv[2];
const seen = {};
const WAIT_MS = 20000;

/** The arguments of the next `event` on `client`; fails rather than hangs. */
function next(client, event) {
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`no ${event} within ${WAIT_MS} ms`)), WAIT_MS);
    client.once(event, (...args) => {
      clearTimeout(timer);
      resolve(args);
    });
  });
}

async function failure(promise) {
  try {
    await promise;
  } catch (error) {
    return { name: error.name, code: error.code, isPubSubError: error instanceof PubSubError };
  }
  return "resolved";
}

let tokens = 0;
const fast = { minDelay: 20, maxDelay: 200 };
const alice = await connect(url, {
  WebSocket,
  token: async () => `token-${++tokens}`,
  reconnect: fast,
});
const bob = await connect(url, { WebSocket, reconnect: fast });
const states = [];
alice.on("state", (state) => states.push(state));

// Subscriptions and publishing, with a handler per channel.
const onNews = [];
seen.subscribe = await alice.subscribe("news", "sport", (payload, channel) =>
  onNews.push([channel, typeof payload === "string" ? payload : "bytes"]),
);
seen.psubscribe = await alice.psubscribe("n*");
const pmessage = next(alice, "pmessage");
const message = next(alice, "message:news");
seen.publish = await bob.publish("news", "hello");
seen.message = await message;
seen.pmessage = await pmessage;
const unicode = next(alice, "message");
seen.publish_unicode = await bob.publish("sport", "héllo ✓");
seen.message_unicode = (await unicode)[1];

// Bytes that are not UTF-8 travel as base64 and come back as a Uint8Array.
const bytes = next(alice, "message:sport");
seen.publish_bytes = await bob.publish("sport", new Uint8Array([0, 255, 10, 13]));
const [payload] = await bytes;
seen.bytes = { isUint8Array: payload instanceof Uint8Array, values: [...payload] };

// Replies other than counts.
seen.numsub = await bob.pubsub("NUMSUB", "news", "nobody");
seen.numpat = await bob.pubsub("NUMPAT");
seen.ping = [await bob.ping(), await bob.ping("hi")];

// Errors reject the request they answer, and only it.
seen.unknown_subcommand = await failure(bob.pubsub("NOSUCH"));
seen.over_the_limit = await failure(alice.subscribe("a", "b"));
seen.channels_after_refusal = alice.channels;
seen.after_errors = await bob.ping("still here");

seen.unsubscribe = await alice.unsubscribe("sport");
seen.handlers_called = onNews;

// The server drops every connection: alice comes back with a new token and
// her subscriptions; a command made while she is away waits for her return.
const reconnecting = next(alice, "reconnecting");
const reopened = next(alice, "open");
const bobBack = next(bob, "open");
console.log("DROP");
const [lost] = await reconnecting;
seen.lost_code = lost.code;
const queued = alice.ping("queued while away");
const [opened] = await reopened;
await bobBack;
seen.resubscribed = opened.resubscribed;
seen.queued = await queued;
const again = next(alice, "message:news");
seen.publish_after_reconnect = await bob.publish("news", "again");
seen.message_after_reconnect = await again;

// Unsubscribing without names drops every channel, then every pattern.
seen.unsubscribe_all = await alice.unsubscribe();
seen.punsubscribe_all = await alice.punsubscribe();
seen.held_at_the_end = [alice.channels, alice.patterns];

// close() is final: no reconnect, and commands reject.
await alice.close();
seen.states = states;
seen.after_close = await failure(alice.publish("news", "x"));
seen.publish_after_close = await bob.publish("news", "nobody listens");
await bob.close();

// Without reconnect, losing the connection closes the client for good.
const once = await connect(url, { WebSocket, reconnect: false });
const closed = next(once, "closed");
console.log("DROP");
const [detail] = await closed;
seen.no_reconnect = [once.state, detail.code];

// Bad input is refused before anything is sent.
seen.bad_url = await failure(Promise.resolve().then(() => new PubSubClient("ftp://x/")));

console.log(JSON.stringify(seen));
