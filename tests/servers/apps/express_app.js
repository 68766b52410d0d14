// An Express app behind nogap: listens on the fd nogap passes (SERVER_FD,
// set with --env SERVER_FD={fd}), answers with the pid (/slow after 6 s),
// and on SIGTERM
// stops the way Express apps usually do: server.close(), then exit when it
// calls back. Since Node 19, http.Server.close() also closes idle keep-alive
// connections at once, and a request already on its way on one of them is
// lost (clients retry it); busy connections finish their response and are
// closed after it.
'use strict';
const express = require('express');

const fd = Number(process.env.SERVER_FD);
const generation = process.env.NOGAP_GENERATION || '0';

const app = express();
app.get('/slow', (req, res) => {
  process.stderr.write(`slow request started pid ${process.pid}\n`);
  setTimeout(() => {
    res.set('X-Pid', String(process.pid));
    res.type('text/plain').send(`pid ${process.pid} gen ${generation}\n`);
  }, 6000);
});
app.get('/', (req, res) => {
  res.set('X-Pid', String(process.pid));
  res.type('text/plain').send(`pid ${process.pid} gen ${generation}\n`);
});

const server = app.listen({ fd }, () => {
  process.stderr.write(`express ${process.pid} listening on fd ${fd}\n`);
});
server.keepAliveTimeout = 60000;

process.on('SIGTERM', () => {
  server.close(() => process.exit(0));
});
