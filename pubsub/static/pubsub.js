/**
 * pubsub.js: the client for the pubsub server's WebSocket protocol.
 *
 * A dependency-free ES module for browsers, and for Node 20+ given a
 * WebSocket implementation (`options.WebSocket`, e.g. the `ws` package).
 * The server serves it at `/pubsub.js`; docs/clients.md documents the API.
 *
 *   import { PubSubClient } from "/pubsub.js";
 *   const client = new PubSubClient("ws://127.0.0.1:9000/");
 *   await client.subscribe("news", (payload) => console.log(payload));
 *   await client.publish("news", "hello");   // resolves with the receiver count
 *
 * What it does beyond framing:
 * - matches replies to requests in order (the server answers each command's
 *   frames in the order the commands came; messages may come between);
 * - rejects a request answered with ["error", text] with a PubSubError whose
 *   `code` is the Redis-style code the text starts with (ERR, NOPERM, ...);
 * - decodes {"base64": ...} payloads to Uint8Array, and sends a Uint8Array
 *   or ArrayBuffer as {"base64": ...};
 * - reconnects with jittered exponential backoff after any close it did not
 *   ask for, and subscribes again to every channel, pattern and shard
 *   channel it holds; commands made while disconnected wait in a bounded
 *   queue and go out once the subscriptions are back;
 * - takes a token (a string, or a function returning one or a Promise of
 *   one, called again before every connection) and sends it as ?token=.
 */

const DEFAULT_OPTIONS = Object.freeze({
  protocols: ["pubsub.json"],
  reconnect: { minDelay: 500, maxDelay: 30000, factor: 2 },
  // A PING now and then finds a connection that died silently, which the
  // browser's WebSocket may not notice for minutes (the server's own pings
  // are answered by the browser without telling the page).
  pingInterval: 30000,
  maxQueue: 1000,
});

// Names per resubscribing command: keeps each frame far below the server's
// message size limit however many names a client holds.
const RESUBSCRIBE_CHUNK = 256;

// The confirmation frame each subscription command gets, one per name.
const CONFIRMATIONS = Object.freeze({
  SUBSCRIBE: "subscribe",
  UNSUBSCRIBE: "unsubscribe",
  PSUBSCRIBE: "psubscribe",
  PUNSUBSCRIBE: "punsubscribe",
  SSUBSCRIBE: "ssubscribe",
  SUNSUBSCRIBE: "sunsubscribe",
});

// Pushes: delivered to listeners, never the answer to a request.
const PUSHES = new Set(["message", "pmessage", "smessage"]);

const noop = () => {};

/** An error from the server (`code` is its first word) or from the client. */
export class PubSubError extends Error {
  /**
   * @param {string} message
   * @param {string} [code] the Redis-style code; read from the message when omitted
   */
  constructor(message, code) {
    super(message);
    this.name = "PubSubError";
    this.code = code ?? (/^[A-Z][A-Z_]*(?=\s|$)/.exec(message)?.[0] || "ERR");
  }
}

/** A minimal event emitter: `on` returns a function that removes the listener. */
class Emitter {
  #listeners = new Map();

  /**
   * @param {string} event
   * @param {Function} listener
   * @returns {() => void} removes the listener
   */
  on(event, listener) {
    if (typeof listener !== "function") throw new TypeError("a listener must be a function");
    let listeners = this.#listeners.get(event);
    if (!listeners) this.#listeners.set(event, (listeners = new Set()));
    listeners.add(listener);
    return () => this.off(event, listener);
  }

  /** @param {string} event @param {Function} listener */
  off(event, listener) {
    const listeners = this.#listeners.get(event);
    if (!listeners) return;
    listeners.delete(listener);
    if (listeners.size === 0) this.#listeners.delete(event);
  }

  /** @param {string} event @param {Function} listener @returns {() => void} */
  once(event, listener) {
    const remove = this.on(event, (...args) => {
      remove();
      listener(...args);
    });
    return remove;
  }

  /** @returns {boolean} whether anyone listened */
  emit(event, ...args) {
    const listeners = this.#listeners.get(event);
    if (!listeners) return false;
    for (const listener of [...listeners]) {
      try {
        listener(...args);
      } catch (error) {
        // One listener's bug must not stop the others or the client; it
        // still surfaces as an uncaught error.
        queueMicrotask(() => {
          throw error;
        });
      }
    }
    return true;
  }
}

/** Bytes to base64, in slices so a large message does not overflow the stack. */
function toBase64(bytes) {
  let binary = "";
  for (let start = 0; start < bytes.length; start += 0x8000) {
    binary += String.fromCharCode.apply(null, bytes.subarray(start, start + 0x8000));
  }
  return btoa(binary);
}

function fromBase64(text) {
  const binary = atob(text);
  const bytes = new Uint8Array(binary.length);
  for (let i = 0; i < binary.length; i++) bytes[i] = binary.charCodeAt(i);
  return bytes;
}

/** A payload as a frame carries it: a string, or {"base64": ...} for bytes. */
function encodePayload(message) {
  if (typeof message === "string") return message;
  if (message instanceof ArrayBuffer) return { base64: toBase64(new Uint8Array(message)) };
  if (ArrayBuffer.isView(message)) {
    const bytes = new Uint8Array(message.buffer, message.byteOffset, message.byteLength);
    return { base64: toBase64(bytes) };
  }
  throw new TypeError("a message must be a string, a Uint8Array or an ArrayBuffer");
}

function decodePayload(payload) {
  if (payload !== null && typeof payload === "object" && typeof payload.base64 === "string") {
    return fromBase64(payload.base64);
  }
  return payload;
}

function checkNames(names, what) {
  for (const name of names) {
    if (typeof name !== "string") throw new TypeError(`${what} names must be strings`);
  }
}

/** Splits a trailing handler off a subscription call's arguments. */
function namesAndHandler(args) {
  const last = args[args.length - 1];
  if (typeof last === "function") return [args.slice(0, -1), last];
  return [args, null];
}

/** ws:// or wss:// for a ws, wss, http or https URL, relative to the page in browsers. */
function websocketURL(url) {
  const base = globalThis.location?.href;
  const parsed = base === undefined ? new URL(url) : new URL(url, base);
  if (parsed.protocol === "http:") parsed.protocol = "ws:";
  else if (parsed.protocol === "https:") parsed.protocol = "wss:";
  if (parsed.protocol !== "ws:" && parsed.protocol !== "wss:") {
    throw new TypeError(`pubsub.js connects to ws:, wss:, http: or https: URLs, not ${url}`);
  }
  parsed.hash = "";
  return parsed;
}

/**
 * One request and the frames that answer it.
 *
 * `answer` is the frame kind expected: a confirmation kind ("subscribe", ...)
 * `expect` times, "reply", or "pong". `untilPong` collects confirmations
 * until the PING sent right after the command is answered: a subscription
 * command without names gets one confirmation per name the server holds,
 * which only the server knows.
 */
class Request {
  constructor(frames, answer, { expect = 1, untilPong = false, retry = true, internal = false }) {
    this.frames = frames;
    this.answer = answer;
    this.expect = expect;
    this.untilPong = untilPong;
    this.retry = retry;
    this.internal = internal;
    this.count = null;
    this.seen = 0;
    this.promise = new Promise((resolve, reject) => {
      this.resolve = resolve;
      this.reject = reject;
    });
    // An internal request nobody awaits must not become an unhandled rejection.
    if (internal) this.promise.catch(noop);
  }

  /** Takes one answering frame; true when the request is complete. */
  take(frame) {
    const [kind, , value] = frame;
    if (this.untilPong && kind === "pong") {
      this.resolve(this.count);
      return true;
    }
    if (kind !== this.answer) {
      this.reject(new PubSubError(`unexpected frame ${JSON.stringify(frame)}`, "PROTOCOL"));
      return true;
    }
    if (kind === "reply" || kind === "pong") {
      this.resolve(frame[1]);
      return true;
    }
    this.count = value;
    this.seen += 1;
    if (!this.untilPong && this.seen === this.expect) {
      this.resolve(this.count);
      return true;
    }
    return false;
  }
}

/**
 * A pub/sub connection that stays up: it reconnects and resubscribes by itself.
 *
 * Events (listen with `on(event, listener)`):
 * - "connecting" ({url, attempt}), "open" ({url, attempt, resubscribed}),
 *   "reconnecting" ({code, reason, attempt, delay}), "closed" ({code, reason}),
 *   and "state" (state, detail) for each of them;
 * - "message" (channel, payload), "pmessage" (pattern, channel, payload),
 *   "smessage" (channel, payload);
 * - "message:<channel>" (payload, channel), "pmessage:<pattern>"
 *   (payload, channel, pattern), "smessage:<channel>" (payload, channel);
 * - "error" (PubSubError): trouble no request is waiting to hear about.
 */
export class PubSubClient extends Emitter {
  #url;
  #token;
  #WebSocket;
  #protocols;
  #reconnect;
  #pingInterval;
  #maxQueue;
  #state = "connecting";
  #socket = null;
  #attempt = 0;
  #timer = null;
  #heartbeat = null;
  #pingUnanswered = false;
  #stopped = false;
  #sent = []; // requests on the wire, awaiting their frames, oldest first
  #queue = []; // requests waiting for an open connection
  #channels = new Set();
  #patterns = new Set();
  #shardChannels = new Set();
  #handlers = new Map(); // "message:news" -> handlers given to subscribe()

  /**
   * @param {string | URL} url ws:, wss:, http: or https:; relative to the page in a browser
   * @param {object} [options]
   * @param {string | (() => string | Promise<string>)} [options.token] sent as ?token=
   * @param {Function} [options.WebSocket] the WebSocket class (default: globalThis.WebSocket)
   * @param {string[]} [options.protocols] subprotocols to offer (default ["pubsub.json"])
   * @param {{minDelay?: number, maxDelay?: number, factor?: number} | false} [options.reconnect]
   * @param {number} [options.pingInterval] ms between keep-alive PINGs; 0 for none
   * @param {number} [options.maxQueue] commands that may wait for a connection
   */
  constructor(url, options = {}) {
    super();
    this.#url = websocketURL(String(url));
    this.#token = options.token ?? null;
    this.#WebSocket = options.WebSocket ?? globalThis.WebSocket;
    if (typeof this.#WebSocket !== "function") {
      throw new TypeError("no WebSocket here: pass options.WebSocket (in Node, the ws package)");
    }
    this.#protocols = options.protocols ?? DEFAULT_OPTIONS.protocols;
    this.#reconnect =
      options.reconnect === false
        ? null
        : { ...DEFAULT_OPTIONS.reconnect, ...(options.reconnect ?? {}) };
    this.#pingInterval = options.pingInterval ?? DEFAULT_OPTIONS.pingInterval;
    this.#maxQueue = options.maxQueue ?? DEFAULT_OPTIONS.maxQueue;
    // After the caller's turn, so listeners added right after `new` hear "connecting".
    queueMicrotask(() => this.#connect());
  }

  /** "connecting", "open", "reconnecting" or "closed". */
  get state() {
    return this.#state;
  }

  /** The server's URL (without the token). */
  get url() {
    return this.#url.href;
  }

  /** The channels this client holds (and resubscribes after a reconnect). */
  get channels() {
    return [...this.#channels];
  }

  get patterns() {
    return [...this.#patterns];
  }

  get shardChannels() {
    return [...this.#shardChannels];
  }

  // -- commands ---------------------------------------------------------------------

  /**
   * SUBSCRIBE; a function as the last argument listens on "message:<channel>"
   * for each channel until it is unsubscribed.
   * @returns {Promise<number>} channels + patterns held on the server afterwards
   */
  subscribe(...args) {
    return this.#hold("SUBSCRIBE", this.#channels, "message", args);
  }

  /** PSUBSCRIBE; a trailing function listens on "pmessage:<pattern>". */
  psubscribe(...args) {
    return this.#hold("PSUBSCRIBE", this.#patterns, "pmessage", args);
  }

  /** SSUBSCRIBE; a trailing function listens on "smessage:<channel>". */
  ssubscribe(...args) {
    return this.#hold("SSUBSCRIBE", this.#shardChannels, "smessage", args);
  }

  /** UNSUBSCRIBE the channels named, or every channel when none is. */
  unsubscribe(...channels) {
    return this.#release("UNSUBSCRIBE", this.#channels, "message", channels);
  }

  punsubscribe(...patterns) {
    return this.#release("PUNSUBSCRIBE", this.#patterns, "pmessage", patterns);
  }

  sunsubscribe(...channels) {
    return this.#release("SUNSUBSCRIBE", this.#shardChannels, "smessage", channels);
  }

  /**
   * @param {string} channel
   * @param {string | Uint8Array | ArrayBuffer} message
   * @returns {Promise<number>} the receiver count, as Redis counts it
   */
  publish(channel, message) {
    checkNames([channel], "channel");
    // Not sent again after a reconnect: it may have been delivered already.
    return this.#send(["PUBLISH", channel, encodePayload(message)], "reply", { retry: false });
  }

  /** SPUBLISH to a shard channel; resolves with the receiver count. */
  spublish(channel, message) {
    checkNames([channel], "channel");
    return this.#send(["SPUBLISH", channel, encodePayload(message)], "reply", { retry: false });
  }

  /**
   * PUBSUB CHANNELS | NUMSUB | NUMPAT | SHARDCHANNELS | SHARDNUMSUB.
   * @returns {Promise<any>} the reply: a list, a flat [name, count, ...] list or a number
   */
  pubsub(subcommand, ...args) {
    checkNames([subcommand, ...args], "PUBSUB argument");
    return this.#send(["PUBSUB", subcommand, ...args], "reply");
  }

  /** @returns {Promise<string>} the text echoed ("" without one) */
  ping(text) {
    const frame = text === undefined ? ["PING"] : ["PING", String(text)];
    return this.#send(frame, "pong");
  }

  /**
   * AUTH with a token; the token (or function) is also used for every later
   * reconnect, so a renewed token survives a dropped connection.
   * @returns {Promise<string>} "OK"
   */
  async auth(token) {
    this.#token = token;
    const value = await (typeof token === "function" ? token() : token);
    checkNames([value], "token");
    return this.#send(["AUTH", value], "reply");
  }

  /**
   * Closes for good: no reconnect; requests waiting are rejected (code CLOSED).
   * @returns {Promise<void>} resolves once the socket has closed
   */
  close(code = 1000, reason = "") {
    if (this.#state === "closed") return Promise.resolve();
    this.#stopped = true;
    const socket = this.#socket;
    let done = Promise.resolve();
    if (socket) {
      done = new Promise((resolve) => {
        this.#detach(socket);
        socket.onclose = () => resolve();
        try {
          socket.close(code, reason);
        } catch {
          resolve();
        }
      });
    }
    this.#finish(code, reason || "closed by the client");
    return done;
  }

  // -- subscriptions held -----------------------------------------------------------

  #hold(command, held, event, args) {
    const [names, handler] = namesAndHandler(args);
    if (names.length === 0) throw new TypeError(`${command} needs at least one name`);
    checkNames(names, command.toLowerCase());
    // Held from now on, so a reconnect before the answer subscribes them too.
    const added = names.filter((name) => !held.has(name));
    for (const name of names) held.add(name);
    if (handler) {
      for (const name of names) this.#addHandler(`${event}:${name}`, handler);
    }
    const request = this.#send([command, ...names], CONFIRMATIONS[command], {
      expect: names.length,
    });
    return request.catch((error) => {
      // A refused command changes nothing on the server; nor here.
      for (const name of added) {
        held.delete(name);
        this.#removeHandlers(`${event}:${name}`);
      }
      throw error;
    });
  }

  #release(command, held, event, names) {
    checkNames(names, command.toLowerCase());
    const released = names.length ? names : [...held];
    for (const name of released) {
      held.delete(name);
      this.#removeHandlers(`${event}:${name}`);
    }
    if (names.length) {
      return this.#send([command, ...names], CONFIRMATIONS[command], { expect: names.length });
    }
    return this.#send([[command], ["PING"]], CONFIRMATIONS[command], { untilPong: true });
  }

  #addHandler(key, handler) {
    let handlers = this.#handlers.get(key);
    if (!handlers) this.#handlers.set(key, (handlers = new Set()));
    if (handlers.has(handler)) return;
    handlers.add(handler);
    this.on(key, handler);
  }

  #removeHandlers(key) {
    for (const handler of this.#handlers.get(key) ?? []) this.off(key, handler);
    this.#handlers.delete(key);
  }

  // -- requests ---------------------------------------------------------------------

  /** Sends a command (or several frames answered as one) and promises its answer. */
  #send(frames, answer, options = {}) {
    const request = new Request(
      Array.isArray(frames[0]) ? frames : [frames],
      answer,
      options,
    );
    if (this.#state === "closed") {
      request.reject(new PubSubError("the client is closed", "CLOSED"));
    } else if (this.#state === "open") {
      this.#transmit(request);
    } else if (this.#queue.length >= this.#maxQueue) {
      request.reject(
        new PubSubError(`${this.#maxQueue} commands already wait for a connection`, "QUEUE_FULL"),
      );
    } else {
      this.#queue.push(request);
    }
    return request.promise;
  }

  #transmit(request) {
    this.#sent.push(request);
    for (const frame of request.frames) this.#socket.send(JSON.stringify(frame));
  }

  #onFrame(data) {
    let frame;
    try {
      if (typeof data !== "string") throw new Error("a binary frame");
      frame = JSON.parse(data);
      if (!Array.isArray(frame) || typeof frame[0] !== "string") throw new Error("not a frame");
    } catch (error) {
      this.#report(new PubSubError(`bad frame from the server: ${error.message}`, "PROTOCOL"));
      return;
    }
    const kind = frame[0];
    if (PUSHES.has(kind)) {
      this.#deliver(frame);
      return;
    }
    const request = this.#sent[0];
    if (!request) {
      this.#report(new PubSubError(`unexpected frame ${data}`, "PROTOCOL"));
      return;
    }
    if (kind === "error") {
      this.#sent.shift();
      request.reject(new PubSubError(String(frame[1])));
    } else if (request.take(frame)) {
      this.#sent.shift();
    }
  }

  #deliver(frame) {
    const kind = frame[0];
    if (kind === "pmessage") {
      const [, pattern, channel, payload] = frame;
      const message = decodePayload(payload);
      this.emit("pmessage", pattern, channel, message);
      this.emit(`pmessage:${pattern}`, message, channel, pattern);
    } else {
      const [, channel, payload] = frame;
      const message = decodePayload(payload);
      this.emit(kind, channel, message);
      this.emit(`${kind}:${channel}`, message, channel);
    }
  }

  #report(error) {
    if (!this.emit("error", error)) console.warn("pubsub.js:", error);
  }

  // -- the connection ---------------------------------------------------------------

  #setState(state, detail) {
    this.#state = state;
    this.emit(state, detail);
    this.emit("state", state, detail);
  }

  async #connect() {
    if (this.#stopped) return;
    this.#setState("connecting", { url: this.url, attempt: this.#attempt });
    const url = new URL(this.#url);
    try {
      const token = await (typeof this.#token === "function" ? this.#token() : this.#token);
      if (token !== null && token !== undefined && token !== "") {
        url.searchParams.set("token", String(token));
      }
    } catch (error) {
      this.#report(new PubSubError(`the token function failed: ${error?.message ?? error}`, "TOKEN"));
      this.#lost(1006, "no token");
      return;
    }
    if (this.#stopped) return;
    let socket;
    try {
      socket = new this.#WebSocket(url.href, this.#protocols);
    } catch (error) {
      this.#report(new PubSubError(`cannot connect: ${error?.message ?? error}`, "CONNECT"));
      this.#lost(1006, String(error?.message ?? error));
      return;
    }
    this.#socket = socket;
    socket.onopen = () => this.#opened();
    socket.onmessage = (event) => this.#onFrame(event.data);
    socket.onclose = (event) => {
      this.#detach(socket);
      this.#socket = null;
      this.#lost(event.code, event.reason);
    };
    // A failure is always followed by a close event, which is what counts.
    socket.onerror = noop;
  }

  #opened() {
    const attempt = this.#attempt;
    this.#attempt = 0;
    this.#state = "open";
    const resubscribed = {
      channels: this.#resubscribe("SUBSCRIBE", this.#channels),
      patterns: this.#resubscribe("PSUBSCRIBE", this.#patterns),
      shardChannels: this.#resubscribe("SSUBSCRIBE", this.#shardChannels),
    };
    const waiting = this.#queue;
    this.#queue = [];
    for (const request of waiting) this.#transmit(request);
    this.#startHeartbeat();
    this.#setState("open", { url: this.url, attempt, resubscribed });
  }

  #resubscribe(command, held) {
    const names = [...held];
    for (let start = 0; start < names.length; start += RESUBSCRIBE_CHUNK) {
      const chunk = names.slice(start, start + RESUBSCRIBE_CHUNK);
      const request = new Request([[command, ...chunk]], CONFIRMATIONS[command], {
        expect: chunk.length,
        internal: true,
      });
      request.promise.catch((error) => {
        // Lost with the connection: still held, the next one subscribes them.
        if (error.code === "DISCONNECTED") return;
        // The server no longer takes them (a limit, a permission): say so,
        // and hold only what the server holds.
        for (const name of chunk) held.delete(name);
        this.#report(new PubSubError(`${command} after reconnecting: ${error.message}`, error.code));
      });
      this.#transmit(request);
    }
    return names;
  }

  #startHeartbeat() {
    if (!this.#pingInterval) return;
    this.#pingUnanswered = false;
    this.#heartbeat = setInterval(() => {
      if (this.#pingUnanswered) {
        this.#drop(4000, `no answer to PING within ${this.#pingInterval} ms`);
        return;
      }
      this.#pingUnanswered = true;
      const request = new Request([["PING"]], "pong", { internal: true, retry: false });
      request.promise.then(() => {
        this.#pingUnanswered = false;
      }, noop);
      this.#transmit(request);
    }, this.#pingInterval);
  }

  #stopHeartbeat() {
    clearInterval(this.#heartbeat);
    this.#heartbeat = null;
  }

  /** Gives up on a socket that stopped answering, without waiting for its close. */
  #drop(code, reason) {
    const socket = this.#socket;
    this.#socket = null;
    if (socket) {
      this.#detach(socket);
      try {
        socket.close(code, reason);
      } catch {
        // It is being abandoned either way.
      }
    }
    this.#lost(code, reason);
  }

  #detach(socket) {
    socket.onopen = null;
    socket.onmessage = null;
    socket.onclose = null;
    // Node's ws throws an error event nobody listens to; keep a listener.
    socket.onerror = noop;
  }

  /** The connection (or an attempt) ended without close() being called. */
  #lost(code, reason) {
    this.#stopHeartbeat();
    if (this.#stopped) return;
    // What was on the wire goes out again after reconnecting, except
    // publishes (they may have been delivered) and the client's own requests
    // (the resubscription is rebuilt from what is held).
    const again = [];
    for (const request of this.#sent) {
      if (request.internal) {
        request.reject(new PubSubError("the connection was lost", "DISCONNECTED"));
      } else if (request.retry) {
        again.push(request);
      } else {
        request.reject(
          new PubSubError(`the connection was lost (${code} ${reason || ""})`.trim(), "DISCONNECTED"),
        );
      }
    }
    this.#sent = [];
    this.#queue = again.concat(this.#queue);
    if (!this.#reconnect) {
      this.#finish(code, reason);
      return;
    }
    this.#attempt += 1;
    const delay = this.#backoff(this.#attempt);
    this.#setState("reconnecting", { code, reason, attempt: this.#attempt, delay });
    this.#timer = setTimeout(() => {
      this.#timer = null;
      this.#connect();
    }, delay);
  }

  /** Exponential, capped, and jittered so clients dropped together come back spread out. */
  #backoff(attempt) {
    const { minDelay, maxDelay, factor } = this.#reconnect;
    const ceiling = Math.min(maxDelay, minDelay * factor ** (attempt - 1));
    return Math.round(ceiling / 2 + (Math.random() * ceiling) / 2);
  }

  #finish(code, reason) {
    this.#stopped = true;
    this.#stopHeartbeat();
    clearTimeout(this.#timer);
    this.#timer = null;
    const closed = new PubSubError("the client is closed", "CLOSED");
    for (const request of this.#sent.concat(this.#queue)) request.reject(closed);
    this.#sent = [];
    this.#queue = [];
    this.#socket = null;
    this.#setState("closed", { code, reason });
  }
}

/**
 * A client whose first connection is open.
 * @returns {Promise<PubSubClient>} rejects if the client closes before that
 */
export function connect(url, options = {}) {
  const client = new PubSubClient(url, options);
  return new Promise((resolve, reject) => {
    const offOpen = client.once("open", () => {
      offClosed();
      resolve(client);
    });
    const offClosed = client.once("closed", ({ code, reason }) => {
      offOpen();
      reject(new PubSubError(`closed before opening (${code} ${reason || ""})`.trim(), "CLOSED"));
    });
  });
}
