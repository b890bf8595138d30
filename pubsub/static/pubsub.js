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
 *   one, called again before every connection) and sends it as ?token=;
 * - recovery (docs/protocol.md, Recovery): keeps the position of the last
 *   message of each channel subscribed with resume(), RESUMEs it from there
 *   on every new connection, so that what was published meanwhile arrives
 *   first, once each and in order, or a "recoveryfailed" event says it
 *   cannot; the same event tells of a gap in a resumed channel's live
 *   messages (offsets the server skipped).
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

// Why a resumed channel RESUMEd on a new connection without a position cannot
// be recovered: it kept no history on the last one (the server's own words for
// that case), or the last one was lost between RESUME's confirmation and the
// position that closes its answer. Messages may have been missed either way.
export const NO_HISTORY = "the channel keeps no history";
export const NO_POSITION = "the connection was lost before the channel's position arrived";

// Why, when a resumed channel's live messages skip the offsets first to last:
// the server could not deliver them (docs/protocol.md, Recovery across nodes).
// The Python client words it the same.
export function neverArrived(epoch, first, last) {
  const which = first === last ? `message ${first}` : `messages ${first} to ${last}`;
  return `${which} of epoch ${epoch} never arrived`;
}

// What a message listener of a resumed channel gets as its last argument when
// the message carries no position (the channel keeps no history).
const LIVE = Object.freeze({ position: null, recovered: false });

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

/**
 * A position from the server, {"epoch": string, "offset": integer >= 0} or
 * null, as a frozen {epoch, offset} or null; throws on anything else.
 */
function parsePosition(value) {
  if (value === null) return null;
  if (
    typeof value === "object" &&
    typeof value.epoch === "string" &&
    Number.isSafeInteger(value.offset) &&
    value.offset >= 0 &&
    Object.keys(value).length === 2
  ) {
    return Object.freeze({ epoch: value.epoch, offset: value.offset });
  }
  throw new PubSubError(`a malformed position: ${JSON.stringify(value)}`, "PROTOCOL");
}

/** A position given to resume(), checked before anything is sent. */
function askedPosition(position) {
  if (
    position === null ||
    typeof position !== "object" ||
    typeof position.epoch !== "string" ||
    !Number.isSafeInteger(position.offset) ||
    position.offset < 0
  ) {
    throw new TypeError("a position is {epoch: string, offset: integer >= 0}");
  }
  return Object.freeze({ epoch: position.epoch, offset: position.offset });
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
  constructor(
    frames,
    answer,
    { expect = 1, untilPong = false, retry = true, internal = false, resume = null },
  ) {
    this.frames = frames;
    this.answer = answer;
    this.expect = expect;
    this.untilPong = untilPong;
    this.retry = retry;
    this.internal = internal;
    this.count = null;
    this.seen = 0;
    // A RESUME: {channel, position}, the position asked for (or undefined).
    // Its frame is made when it is sent, from what the client knows then; the
    // client reads its answer itself (see #onResumeAnswer).
    this.resume = resume;
    this.sentBefore = false; // sent once: sending it again follows a lost connection
    this.reopening = false; // sent as a new connection opened, in place of subscribing again
    this.confirmed = false; // its subscribe frame came
    this.cancelled = false; // the channel was unsubscribed meanwhile
    this.unrecoverable = null; // why it cannot recover, whatever the server says
    this.replayed = 0; // messages replayed in its answer
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
    if (kind === "history") {
      this.resolve(frame);
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
 *   "message" and "message:<channel>" listeners get one more argument for
 *   the messages of channels subscribed with resume() (and any message that
 *   carries a position), {position, recovered}: the message's position in
 *   its channel's history (null when it keeps none) and whether it was
 *   replayed by a RESUME rather than delivered live;
 * - "recoveryfailed" ({channel, reason, position}): a RESUME, the caller's
 *   or the client's own after reconnecting, could not recover what was
 *   missed; the channel is subscribed all the same, at position. Or a
 *   resumed channel's live message came after a gap (neverArrived's
 *   reason), at position;
 * - "resumed" ({channel, recovered, reason, position, replayed}): the client
 *   RESUMEd a channel by itself on a new connection, and how it went;
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
  #resumed = new Set(); // held channels whose RESUME was confirmed
  #asked = new Set(); // held channels resume() was called for, confirmed or not
  // The last position known of each resumed channel, from RESUME's answers and
  // the messages since; null when it keeps no history, absent until known.
  #positions = new Map();
  #recovering = new Map(); // channel -> the RESUME whose replay is arriving

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

  /**
   * The position of the last message received on a channel subscribed with
   * resume(): {epoch, offset}; null when the channel keeps no history;
   * undefined when none is known (not resumed, or its answer is not in yet).
   * Kept after close(), so that a new client can resume from it.
   */
  position(channel) {
    return this.#positions.get(channel);
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

  /**
   * RESUME: subscribes to the channel so that what is published on it while
   * the connection is down is recovered. The messages published after
   * `position` ({epoch, offset}; by default the last one received on it, and
   * the first time none) are delivered first, then the live ones; every new
   * connection RESUMEs it again from the last message received, and a
   * message already received on it is never delivered twice. When what was
   * missed cannot be recovered, a "recoveryfailed" event says so.
   *
   * A function `handler` listens on "message:<channel>" until it is
   * unsubscribed. Resolves once the replayed messages have been delivered,
   * with {channel, recovered, reason, position, replayed}: recovered is false
   * (and reason the server's) when the messages after the position asked for
   * could not be sent; position is where the channel is now (null when it
   * keeps no history); replayed counts the messages replayed.
   * @returns {Promise<{channel: string, recovered: boolean, reason: string | null,
   *   position: {epoch: string, offset: number} | null, replayed: number}>}
   */
  resume(channel, handler, position) {
    checkNames([channel], "channel");
    if (handler !== undefined && handler !== null && typeof handler !== "function") {
      throw new TypeError("a handler must be a function");
    }
    const asked = position === undefined || position === null ? undefined : askedPosition(position);
    const added = !this.#channels.has(channel);
    this.#channels.add(channel);
    this.#asked.add(channel);
    if (handler) this.#addHandler(`message:${channel}`, handler);
    const request = new Request(null, "subscribe", { resume: { channel, position: asked } });
    this.#submit(request);
    return request.promise.catch((error) => {
      // Refused, or never sent: the server does not hold it, nor does the
      // client, unless it held it before (and the server still does, unless
      // this RESUME stood in for subscribing it again on a new connection).
      if (added || (request.reopening && error.code !== "CLOSED")) this.#forget(channel);
      throw error;
    });
  }

  /**
   * HISTORY: the channel's last `count` messages its history still keeps,
   * oldest first. Resolves with {channel, position, messages}: position is
   * the channel's (null when it keeps no history), and each message is
   * {payload, position}.
   */
  history(channel, count) {
    checkNames([channel], "channel");
    if (!Number.isSafeInteger(count) || count < 0) {
      throw new TypeError("a history count is an integer >= 0");
    }
    return this.#send(["HISTORY", channel, String(count)], "history").then((frame) => {
      const [, , where, kept] = frame;
      const position = parsePosition(where);
      if (!Array.isArray(kept) || (position === null && kept.length)) {
        throw new PubSubError(`a malformed history frame: ${JSON.stringify(frame)}`, "PROTOCOL");
      }
      const messages = kept.map((item) => {
        if (!Array.isArray(item) || item.length !== 2 || !Number.isSafeInteger(item[0])) {
          throw new PubSubError(`a malformed history message: ${JSON.stringify(item)}`, "PROTOCOL");
        }
        return {
          payload: decodePayload(item[1]),
          position: Object.freeze({ epoch: position.epoch, offset: item[0] }),
        };
      });
      return { channel, position, messages };
    });
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
    if (command === "UNSUBSCRIBE") {
      // A resumed channel's position goes: resuming it later starts afresh,
      // and a RESUME of it still on its way no longer makes it resumed.
      const gone = new Set(released);
      for (const name of released) {
        this.#resumed.delete(name);
        this.#asked.delete(name);
        this.#positions.delete(name);
      }
      for (const request of this.#sent.concat(this.#queue)) {
        if (request.resume && gone.has(request.resume.channel)) request.cancelled = true;
      }
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

  /** A channel the server does not hold: nor does the client, from now on. */
  #forget(channel) {
    this.#channels.delete(channel);
    this.#resumed.delete(channel);
    this.#asked.delete(channel);
    this.#positions.delete(channel);
    this.#removeHandlers(`message:${channel}`);
  }

  // -- requests ---------------------------------------------------------------------

  /** Sends a command (or several frames answered as one) and promises its answer. */
  #send(frames, answer, options = {}) {
    const request = new Request(
      Array.isArray(frames[0]) ? frames : [frames],
      answer,
      options,
    );
    this.#submit(request);
    return request.promise;
  }

  /** Sends a request now, or queues it until the connection is open. */
  #submit(request) {
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
  }

  /** `reopening`: sent as the new connection opens, before anything came on it. */
  #transmit(request, reopening = false) {
    if (request.resume) request.frames = [this.#resumeFrame(request, reopening)];
    this.#sent.push(request);
    for (const frame of request.frames) this.#socket.send(JSON.stringify(frame));
  }

  /**
   * A RESUME's frame, from the position it asked for the first time it goes
   * out, from the last one received after that (what a lost answer already
   * delivered is not asked for again). On a new connection a resumed channel
   * with no position to resume from cannot be recovered, whatever the server
   * answers: messages may have been missed, and nothing can tell which.
   */
  #resumeFrame(request, reopening) {
    const { channel, position: asked } = request.resume;
    const known = this.#positions.get(channel);
    const from = request.sentBefore ? (known ?? asked) : (asked ?? known);
    request.sentBefore = true;
    request.reopening = reopening;
    request.confirmed = false;
    request.unrecoverable = null;
    if (!from && reopening && this.#resumed.has(channel)) {
      request.unrecoverable = known === null ? NO_HISTORY : NO_POSITION;
    }
    return from ? ["RESUME", channel, from.epoch, String(from.offset)] : ["RESUME", channel];
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
      if (request.resume) this.#endRecovery(request);
      request.reject(new PubSubError(String(frame[1])));
    } else if (request.resume ? this.#onResumeAnswer(request, frame) : request.take(frame)) {
      this.#sent.shift();
    }
  }

  /**
   * One frame of a RESUME's answer: the confirmation, then (after the
   * replayed messages, which are pushes) position or recovery_failed, which
   * ends it. True when it has ended.
   */
  #onResumeAnswer(request, frame) {
    const [kind, name] = frame;
    const { channel } = request.resume;
    if (kind === "subscribe" && !request.confirmed && name === channel) {
      request.confirmed = true;
      // Resumed from now on, unless unsubscribed meanwhile.
      if (!request.cancelled && this.#channels.has(channel)) this.#resumed.add(channel);
      this.#recovering.set(channel, request);
      return false;
    }
    this.#endRecovery(request);
    const failed = kind === "recovery_failed";
    let position;
    try {
      if (
        !(kind === "position" || failed) ||
        !request.confirmed ||
        name !== channel ||
        frame.length !== (failed ? 4 : 3) ||
        (failed && typeof frame[3] !== "string")
      ) {
        throw new PubSubError(`unexpected frame ${JSON.stringify(frame)}`, "PROTOCOL");
      }
      position = parsePosition(frame[2]);
    } catch (error) {
      request.reject(error);
      return true;
    }
    if (!request.cancelled && this.#resumed.has(channel)) this.#positions.set(channel, position);
    const reason = failed ? frame[3] : request.unrecoverable;
    const recovery = Object.freeze({
      channel,
      recovered: reason === null,
      reason,
      position,
      replayed: request.replayed,
    });
    request.resolve(recovery);
    if (!request.cancelled) {
      if (request.internal) this.emit("resumed", recovery);
      if (reason !== null) this.#recoveryFailed(channel, reason, position);
    }
    return true;
  }

  #recoveryFailed(channel, reason, position) {
    const detail = Object.freeze({ channel, reason, position });
    if (!this.emit("recoveryfailed", detail)) {
      const missed = "messages may have been missed";
      console.warn(`pubsub.js: recovering ${channel} failed, ${missed}: ${reason}`);
    }
  }

  #endRecovery(request) {
    const { channel } = request.resume;
    if (this.#recovering.get(channel) === request) this.#recovering.delete(channel);
  }

  #deliver(frame) {
    const kind = frame[0];
    if (kind === "pmessage") {
      const [, pattern, channel, payload] = frame;
      const message = decodePayload(payload);
      this.emit("pmessage", pattern, channel, message);
      this.emit(`pmessage:${pattern}`, message, channel, pattern);
    } else if (kind === "message") {
      const [, channel, payload] = frame;
      const info = this.#where(frame);
      if (info === null) return;
      const message = decodePayload(payload);
      if (info === undefined) {
        this.emit(kind, channel, message);
        this.emit(`${kind}:${channel}`, message, channel);
      } else {
        this.emit(kind, channel, message, info);
        this.emit(`${kind}:${channel}`, message, channel, info);
      }
    } else {
      const [, channel, payload] = frame;
      const message = decodePayload(payload);
      this.emit(kind, channel, message);
      this.emit(`${kind}:${channel}`, message, channel);
    }
  }

  /**
   * A message's {position, recovered}; undefined for a message without a
   * position on a channel not resumed (as before recovery existed); null
   * when it was delivered already: a resumed channel's position moves with
   * each message, and one at or before it in the same epoch came before (a
   * RESUME of a channel held replays what was on its way live meanwhile).
   * A live message past the next offset (or, in a new epoch, past its first)
   * comes after a gap the server could not fill: "recoveryfailed" says so
   * first. A replay may start anywhere (a position given to resume()): its
   * answer judges it.
   */
  #where(frame) {
    const channel = frame[1];
    const recovering = this.#recovering.get(channel);
    if (frame.length < 4) {
      if (recovering) return Object.freeze({ position: null, recovered: true });
      return this.#asked.has(channel) || this.#resumed.has(channel) ? LIVE : undefined;
    }
    let position;
    try {
      position = parsePosition(frame[3]);
    } catch (error) {
      this.#report(error);
      return null;
    }
    if (position !== null && this.#resumed.has(channel)) {
      const known = this.#positions.get(channel);
      const after = known ? (known.epoch === position.epoch ? known.offset : 0) : undefined;
      if (after !== undefined && position.offset <= after) return null;
      this.#positions.set(channel, position);
      if (after !== undefined && position.offset > after + 1 && !recovering) {
        const reason = neverArrived(position.epoch, after + 1, position.offset - 1);
        this.#recoveryFailed(channel, reason, position);
      }
    }
    if (recovering) recovering.replayed += 1;
    return Object.freeze({ position, recovered: recovering !== undefined });
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
    const waiting = this.#queue;
    this.#queue = [];
    // A resumed channel gets a RESUME of its own, from its last position; a
    // caller's RESUME waiting to go out subscribes its channel itself (a
    // SUBSCRIBE first would deliver, unpositioned, what it then replays).
    const resuming = new Set(waiting.filter((r) => r.resume).map((r) => r.resume.channel));
    const channels = [...this.#channels];
    const plain = channels.filter((name) => !this.#resumed.has(name) && !resuming.has(name));
    this.#resubscribe("SUBSCRIBE", plain, this.#channels);
    const resubscribed = {
      channels,
      patterns: this.#resubscribe("PSUBSCRIBE", [...this.#patterns], this.#patterns),
      shardChannels: this.#resubscribe("SSUBSCRIBE", [...this.#shardChannels], this.#shardChannels),
    };
    for (const channel of channels) {
      if (this.#resumed.has(channel) && !resuming.has(channel)) this.#resumeAgain(channel);
    }
    for (const request of waiting) this.#transmit(request, true);
    this.#startHeartbeat();
    this.#setState("open", { url: this.url, attempt, resubscribed });
  }

  #resumeAgain(channel) {
    const request = new Request(null, "subscribe", {
      internal: true,
      resume: { channel, position: undefined },
    });
    request.promise.catch((error) => {
      if (error.code === "DISCONNECTED" || error.code === "CLOSED") return;
      this.#forget(channel);
      this.#report(new PubSubError(`RESUME after reconnecting: ${error.message}`, error.code));
    });
    this.#transmit(request, true);
  }

  #resubscribe(command, names, held) {
    for (let start = 0; start < names.length; start += RESUBSCRIBE_CHUNK) {
      const chunk = names.slice(start, start + RESUBSCRIBE_CHUNK);
      const request = new Request([[command, ...chunk]], CONFIRMATIONS[command], {
        expect: chunk.length,
        internal: true,
      });
      request.promise.catch((error) => {
        // Lost with the connection: still held, the next one subscribes them
        // (or, closed, still listed as what the client held).
        if (error.code === "DISCONNECTED" || error.code === "CLOSED") return;
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
    this.#recovering.clear();
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
