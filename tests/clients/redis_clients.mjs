// Drives ioredis and node-redis against the RESP port given as argv[2], as an
// application would use them, and prints one JSON object of what each saw.
// tests/integration/test_node_clients.py runs it and checks every field.
import Redis from "ioredis";
import { createClient } from "redis";

const port = Number(process.argv[2]);
const seen = {};

async function ioredis() {
  // Defaults on: the ready check (INFO) and a connection name (CLIENT SETNAME).
  const sub = new Redis({ port, connectionName: "io-sub", lazyConnect: true });
  const pub = new Redis({ port, lazyConnect: true });
  await sub.connect();
  await pub.connect();
  const message = new Promise((resolve) =>
    sub.on("messageBuffer", (channel, data) => resolve([channel.toString(), [...data]])),
  );
  seen.ioredis_name = await sub.client("GETNAME");
  seen.ioredis_subscribe = await sub.subscribe("news");
  seen.ioredis_publish = await pub.publish("news", Buffer.from([0, 255, 10, 13]));
  seen.ioredis_message = await message;
  seen.ioredis_numsub = await pub.pubsub("NUMSUB", "news");
  await sub.quit();
  await pub.quit();
}

async function nodeRedis(protocol) {
  const client = createClient({ url: `redis://127.0.0.1:${port}`, database: 3, RESP: protocol });
  const subscriber = client.duplicate();
  await client.connect();
  await subscriber.connect();
  const pmessage = new Promise((resolve) =>
    subscriber.pSubscribe("n*", (message, channel) => resolve([channel, message])),
  );
  // pSubscribe's own promise resolves once the server confirmed it.
  await subscriber.pSubscribe("other*", () => {});
  const key = `node_redis_resp${protocol}`;
  seen[`${key}_publish`] = await client.publish("news", "hello");
  seen[`${key}_pmessage`] = await pmessage;
  seen[`${key}_numpat`] = await client.pubSubNumPat();
  seen[`${key}_ping`] = await client.ping();
  await subscriber.close();
  await client.close();
}

try {
  await ioredis();
  await nodeRedis(2);
  await nodeRedis(3);
  console.log(JSON.stringify(seen));
} catch (error) {
  console.error(error);
  console.log(JSON.stringify({ ...seen, error: String(error) }));
  process.exit(1);
}
