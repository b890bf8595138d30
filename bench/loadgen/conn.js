'use strict';
// Client connections of the load generator: WebSocket (JSON frames, as
// docs/protocol.md) and RESP2 (redis-server), over plain `net` sockets.
//
// Both are hand-written and lean on purpose: the load generator must cost
// far less per delivery than either server, so a received message is never
// decoded into strings or objects.  A push is recognised by its first bytes,
// and the benchmark payload (fixed length, ASCII, ends the frame) is handed
// to the handler as a (buffer, offset) pair; see payload.js for its layout.
//
// Handler interface (every method optional except onMessage):
//   onMessage(buf, payloadOffset, positioned)
//                                   a message or pmessage push; `positioned`
//                                   is true for a WebSocket message frame
//                                   with a 4th element, its position in the
//                                   channel's history (after a RESUME)
//   onConfirm()                     one subscribe/psubscribe confirmation
//   onPosition()                    one `position` frame (RESUME's second answer)
//   onReply(n)                      an integer reply (PUBLISH's receiver count)
//   onError(text)                   an error reply, or a protocol surprise
//   onClose()                       the connection ended

const net = require('net');
const crypto = require('crypto');

const WS_GUID = '258EAFA5-E914-47DA-95CA-C5AB0DC85B11';
const QUOTE = 0x22;
const COMMA = 0x2c;
const BRACKET_CLOSE = 0x5d;
const BRACE_OPEN = 0x7b;
const BRACE_CLOSE = 0x7d;
const CR = 0x0d;

const readBuffer = Buffer.allocUnsafe(256 * 1024);

// Handshake keys are cut from a pool of random bytes filled 1,024 keys at a
// time: 0.2 us a key instead of 4 us for a randomBytes call each.
const KEY_BYTES = 16;
const keyPool = Buffer.allocUnsafe(KEY_BYTES * 1024);
let keyOffset = keyPool.length;

function handshakeKey() {
  if (keyOffset === keyPool.length) {
    crypto.randomFillSync(keyPool);
    keyOffset = 0;
  }
  keyOffset += KEY_BYTES;
  return keyPool.toString('base64', keyOffset - KEY_BYTES, keyOffset);
}

class BaseConn {
  constructor(port, handler, payloadLength) {
    this.port = port;
    this.h = handler;
    this.L = payloadLength;
    this.rest = null;
    this.sock = null;
    this.closed = false;
  }

  write(data) {
    if (!this.closed) this.sock.write(data);
  }

  destroy() {
    this.closed = true;
    if (this.sock) this.sock.destroy();
  }

  // Every socket of a process reads into one shared buffer (`onread`):
  // no allocation and no stream machinery per read, which is most of what a
  // read costs in Node.  Whatever is left unparsed is copied out before the
  // next read can overwrite it.
  _open(onConnect, reject) {
    const sock = net.connect({
      port: this.port,
      host: '127.0.0.1',
      onread: { buffer: readBuffer, callback: (n, buf) => this._onRead(buf.subarray(0, n)) },
    });
    this.sock = sock;
    sock.setNoDelay(true);
    sock.on('connect', onConnect);
    sock.on('error', (err) => {
      if (!this.ready) reject(err);
      else if (this.h.onError) this.h.onError('socket: ' + err.message);
    });
    sock.on('close', () => {
      const was = this.closed;
      this.closed = true;
      if (!this.ready) reject(new Error('closed during handshake'));
      else if (!was && this.h.onClose) this.h.onClose();
    });
  }

  _onRead(chunk) {
    if (this.ready) this._onData(chunk);
    else if (this._handshake) this._handshake(chunk);
  }

  _take(chunk) {
    if (this.rest === null) return chunk;
    const buf = Buffer.concat([this.rest, chunk]);
    this.rest = null;
    return buf;
  }

  _keep(buf, p) {
    this.rest = Buffer.from(buf.subarray(p));
  }
}

// ---------------------------------------------------------------- WebSocket

class WsConn extends BaseConn {
  connect() {
    return new Promise((resolve, reject) => {
      const key = handshakeKey();
      this.accept = crypto.createHash('sha1').update(key + WS_GUID).digest('base64');
      this._open(() => {
        this.sock.write(
          'GET / HTTP/1.1\r\n' +
            `Host: 127.0.0.1:${this.port}\r\n` +
            'Upgrade: websocket\r\nConnection: Upgrade\r\n' +
            `Sec-WebSocket-Key: ${key}\r\nSec-WebSocket-Version: 13\r\n\r\n`,
          'latin1',
        );
      }, reject);
      let head = null;
      this._handshake = (chunk) => {
        head = head === null ? Buffer.from(chunk) : Buffer.concat([head, chunk]);
        const end = head.indexOf('\r\n\r\n');
        if (end < 0) {
          if (head.length > 16384) reject(new Error('handshake response too long'));
          return;
        }
        const text = head.subarray(0, end).toString('latin1');
        const status = text.slice(0, text.indexOf('\r\n'));
        const m = /\r\nsec-websocket-accept:\s*(\S+)/i.exec(text);
        if (!/^HTTP\/1\.1 101 /.test(status) || !m || m[1] !== this.accept) {
          this.sock.destroy();
          reject(new Error('handshake refused: ' + status));
          return;
        }
        this._handshake = null;
        this.ready = true;
        resolve(this);
        if (head.length > end + 4) this._onData(head.subarray(end + 4));
      };
    });
  }

  // A masked client text frame holding `text` (ASCII).
  static frame(text) {
    const len = text.length;
    const mo = len < 126 ? 2 : 4;
    const out = Buffer.allocUnsafe(mo + 4 + len);
    out[0] = 0x81;
    if (len < 126) out[1] = 0x80 | len;
    else {
      out[1] = 0x80 | 126;
      out.writeUInt16BE(len, 2);
    }
    const mask = (Math.random() * 0x100000000) >>> 0;
    out.writeUInt32BE(mask, mo);
    const m0 = out[mo], m1 = out[mo + 1], m2 = out[mo + 2], m3 = out[mo + 3];
    const base = mo + 4;
    out.write(text, base, 'latin1');
    let i = 0;
    for (; i + 3 < len; i += 4) {
      out[base + i] ^= m0;
      out[base + i + 1] ^= m1;
      out[base + i + 2] ^= m2;
      out[base + i + 3] ^= m3;
    }
    for (; i < len; i++) out[base + i] ^= out[mo + (i & 3)];
    return out;
  }

  static command(args) {
    return WsConn.frame(JSON.stringify(args));
  }

  _onData(chunk) {
    const buf = this._take(chunk);
    const n = buf.length;
    let p = 0;
    while (p + 2 <= n) {
      const b0 = buf[p];
      let len = buf[p + 1];
      let s = p + 2;
      if (len & 0x80) {
        this._fail('server sent a masked frame');
        return;
      }
      if (len === 126) {
        if (p + 4 > n) break;
        len = buf.readUInt16BE(p + 2);
        s = p + 4;
      } else if (len === 127) {
        if (p + 10 > n) break;
        len = Number(buf.readBigUInt64BE(p + 2));
        s = p + 10;
      }
      const e = s + len;
      if (e > n) break;
      const op = b0 & 0x0f;
      if (b0 === 0x81) this._text(buf, s, e);
      else if (op === 0x8) {
        const code = len >= 2 ? buf.readUInt16BE(s) : 1005;
        this._fail(`server closed: ${code} ${buf.toString('utf8', s + 2, e)}`);
        return;
      } else if (op === 0x9) {
        const pong = Buffer.alloc(6 + len);
        pong[0] = 0x8a;
        pong[1] = 0x80 | len;
        buf.copy(pong, 6, s, e);
        this.write(pong);
      } else if (op !== 0xa) {
        this._fail(`unexpected frame 0x${b0.toString(16)}`);
        return;
      }
      p = e;
    }
    if (p < n) this._keep(buf, p);
  }

  _text(buf, s, e) {
    // Frames are compact JSON arrays: ["message","ch","payload"], ...
    const c = buf[s + 2];
    if (c === 0x6d /* m */ || (c === 0x70 /* p */ && buf[s + 3] === 0x6d)) {
      // `tail` is the byte after the payload's closing quote: the frame's
      // last `]`, or, in a message with its position after a RESUME
      // (["message","ch","payload",{"epoch":"9f2c1a0b","offset":42}]), the
      // comma before the position, the frame's last `{` (the payload has none).
      let tail = e - 1;
      let positioned = false;
      if (buf[e - 2] === BRACE_CLOSE) {
        tail = buf.lastIndexOf(BRACE_OPEN, e - 3) - 1;
        positioned = true;
      }
      const off = tail - 1 - this.L;
      if (
        off <= s ||
        buf[e - 1] !== BRACKET_CLOSE ||
        buf[tail] !== (positioned ? COMMA : BRACKET_CLOSE) ||
        buf[tail - 1] !== QUOTE ||
        buf[off - 1] !== QUOTE
      ) {
        this._error(buf.toString('utf8', s, e));
        return;
      }
      this.h.onMessage(buf, off, positioned);
    } else if (c === 0x72 /* r */ && buf[s + 4] === 0x70 /* ["reply" */) {
      // ["reply",N]
      let v = 0;
      for (let i = s + 9; i < e - 1; i++) v = v * 10 + (buf[i] - 48);
      if (this.h.onReply) this.h.onReply(v);
    } else if (c === 0x73 /* s */ || (c === 0x70 && buf[s + 3] === 0x73) /* psubscribe */) {
      if (this.h.onConfirm) this.h.onConfirm();
    } else if (c === 0x70 && buf[s + 3] === 0x6f /* ["position",ch,{...} or null] */) {
      if (this.h.onPosition) this.h.onPosition();
      else this._error(buf.toString('utf8', s, e));
    } else {
      this._error(buf.toString('utf8', s, e));
    }
  }

  _error(text) {
    if (this.h.onError) this.h.onError(text);
  }

  _fail(text) {
    this._error(text);
    this.destroy();
    if (this.h.onClose) this.h.onClose();
  }
}

// --------------------------------------------------------------------- RESP

function respCommand(args) {
  let s = `*${args.length}\r\n`;
  for (const a of args) s += `$${Buffer.byteLength(a)}\r\n${a}\r\n`;
  return s;
}

class RespConn extends BaseConn {
  constructor(port, handler, payloadLength) {
    super(port, handler, payloadLength);
    this.starts = new Int32Array(8);
    this.lens = new Int32Array(8);
  }

  connect() {
    return new Promise((resolve, reject) => {
      this._open(() => {
        this.ready = true;
        resolve(this);
      }, reject);
    });
  }

  static command(args) {
    return Buffer.from(respCommand(args), 'latin1');
  }

  _onData(chunk) {
    const buf = this._take(chunk);
    const n = buf.length;
    let p = 0;
    while (p < n) {
      const c = buf[p];
      if (c === 0x2a /* * */) {
        const q = this._array(buf, p, n);
        if (q < 0) break;
        p = q;
      } else {
        // :N, -ERR, +OK: one line.
        const eol = buf.indexOf(CR, p);
        if (eol < 0 || eol + 1 >= n) break;
        if (c === 0x3a /* : */) {
          let v = 0;
          for (let i = p + 1; i < eol; i++) v = v * 10 + (buf[i] - 48);
          if (this.h.onReply) this.h.onReply(v);
        } else if (this.h.onError) this.h.onError(buf.toString('utf8', p, eol));
        p = eol + 2;
      }
    }
    if (p < n) this._keep(buf, p);
  }

  // One push (an array of bulk strings and integers) at p; returns the
  // offset after it, or -1 when it is not complete yet.
  _array(buf, p, n) {
    let i = p + 1;
    let count = 0;
    while (i < n && buf[i] !== CR) count = count * 10 + (buf[i++] - 48);
    i += 2;
    if (i > n || count > 8) return count > 8 ? this._bad(buf, p) : -1;
    const starts = this.starts, lens = this.lens;
    for (let k = 0; k < count; k++) {
      if (i >= n) return -1;
      const t = buf[i];
      let v = 0;
      let j = i + 1;
      while (j < n && buf[j] !== CR) v = v * 10 + (buf[j++] - 48);
      j += 2;
      if (j > n) return -1;
      if (t === 0x24 /* $ */) {
        if (j + v + 2 > n) return -1;
        starts[k] = j;
        lens[k] = v;
        j += v + 2;
      } else if (t === 0x3a /* : */) {
        starts[k] = -1;
        lens[k] = v;
      } else return this._bad(buf, p);
      i = j;
    }
    const kind = buf[starts[0]];
    const klen = lens[0];
    if ((kind === 0x6d && klen === 7) || (kind === 0x70 && klen === 8)) {
      // message / pmessage: the payload is the last element.
      const last = count - 1;
      if (lens[last] !== this.L) this._error(buf.toString('utf8', p, i));
      else this.h.onMessage(buf, starts[last]);
    } else if (this.h.onConfirm && (kind === 0x73 || kind === 0x70)) {
      this.h.onConfirm();
    } else this._error(buf.toString('utf8', p, i));
    return i;
  }

  _bad(buf, p) {
    this._error('unparsable RESP at ' + JSON.stringify(buf.toString('latin1', p, p + 40)));
    this.destroy();
    return buf.length;
  }

  _error(text) {
    if (this.h.onError) this.h.onError(text);
  }
}

function connClass(server) {
  return server === 'redis' ? RespConn : WsConn;
}

module.exports = { WsConn, RespConn, connClass, respCommand };
