// pubsub.js against a server that requires tokens (argv[2]: ws://..., argv[3]:
// a token allowing subscribe/publish on "news", argv[4]: a token that has
// expired). Prints one JSON object of what it saw as its last line; checked by
// tests/integration/test_pubsub_js.py.
import WebSocket from "ws";
import { PubSubError, connect } from "../../pubsub/static/pubsub.js";

const [url, good, expired] = process.argv.slice(2);
const seen = {};

async function failure(promise) {
  try {
    await promise;
  } catch (error) {
    return { code: error.code, isPubSubError: error instanceof PubSubError, message: error.message };
  }
  return "resolved";
}

const options = { WebSocket, reconnect: { minDelay: 20, maxDelay: 200 }, pingInterval: 0 };
const anonymous = await connect(url, options);
seen.before_auth = await failure(anonymous.subscribe("news"));
seen.bad_auth = await failure(anonymous.auth(expired));
seen.auth = await anonymous.auth(good);
seen.subscribe = await anonymous.subscribe("news");
seen.not_allowed = await failure(anonymous.subscribe("secret"));

const holder = await connect(url, { ...options, token: good });
const message = new Promise((resolve) => anonymous.once("message:news", (...args) => resolve(args)));
seen.publish = await holder.publish("news", "with a token");
seen.message = await message;
await anonymous.close();
await holder.close();
console.log(JSON.stringify(seen));
