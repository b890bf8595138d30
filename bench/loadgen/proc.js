'use strict';
// Figures from /proc: a process's CPU time and resident memory.
const fs = require('fs');

// utime + stime of the whole process (all threads), in clock ticks.
function cpuTicks(pid) {
  const text = fs.readFileSync(`/proc/${pid}/stat`, 'latin1');
  const fields = text.slice(text.lastIndexOf(')') + 2).split(' ');
  return Number(fields[11]) + Number(fields[12]);
}

// Time on CPU in ns, summed over the process's live threads
// (/proc/PID/task/TID/schedstat): exact where the ticks above are 10 ms.
function cpuNs(pid) {
  let ns = 0;
  for (const tid of fs.readdirSync(`/proc/${pid}/task`)) {
    try {
      ns += Number(fs.readFileSync(`/proc/${pid}/task/${tid}/schedstat`, 'latin1').split(' ')[0]);
    } catch (_) {
      /* the thread ended */
    }
  }
  return ns;
}

function rssKb(pid) {
  const m = /VmRSS:\s+(\d+) kB/.exec(fs.readFileSync(`/proc/${pid}/status`, 'latin1'));
  return m ? Number(m[1]) : null;
}

// TCP listen-queue overflows and drops, machine-wide (TcpExt in /proc/net/netstat).
function listenDrops() {
  const lines = fs.readFileSync('/proc/net/netstat', 'latin1').split('\n');
  for (let i = 0; i + 1 < lines.length; i += 2) {
    if (lines[i].startsWith('TcpExt:')) {
      const names = lines[i].split(/\s+/);
      const values = lines[i + 1].split(/\s+/);
      const get = (n) => Number(values[names.indexOf(n)] || 0);
      return get('ListenOverflows') + get('ListenDrops');
    }
  }
  return 0;
}

module.exports = { cpuTicks, cpuNs, rssKb, listenDrops };
