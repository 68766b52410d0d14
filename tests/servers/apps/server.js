// A Node.js http server behind nogap: listen({fd}) on the fd nogap passes
// (SERVER_FD, set with --env SERVER_FD={fd}), answer with the pid, and on
// SIGTERM drain without dropping a keep-alive request: stop accepting, answer
// what comes on open connections with "Connection: close", exit when none is
// left (or after DRAIN_MS).
'use strict';
const http = require('http');
const net = require('net');

const fd = Number(process.env.SERVER_FD);
const generation = process.env.NOGAP_GENERATION || '0';
const drainMs = Number(process.env.DRAIN_MS || 10000);
let draining = false;
let open = 0;

const server = http.createServer((req, res) => {
  const body = `pid ${process.pid} gen ${generation}\n`;
  const headers = {
    'Content-Type': 'text/plain',
    'Content-Length': Buffer.byteLength(body),
    'X-Pid': String(process.pid),
  };
  if (draining) headers['Connection'] = 'close';
  res.writeHead(200, headers);
  res.end(body);
});
server.keepAliveTimeout = 60000;
server.on('connection', (sock) => {
  open++;
  sock.on('close', () => {
    open--;
    if (draining && open === 0) process.exit(0);
  });
});
server.listen({ fd }, () => {
  process.stderr.write(`node ${process.pid} listening on fd ${fd}\n`);
});

process.on('SIGTERM', () => {
  draining = true;
  // net.Server's close stops accepting; http.Server's would also close idle
  // keep-alive connections, racing requests already on their way.
  net.Server.prototype.close.call(server);
  if (open === 0) process.exit(0);
  setTimeout(() => process.exit(0), drainMs).unref();
});
