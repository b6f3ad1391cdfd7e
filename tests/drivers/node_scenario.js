// node-postgres (pg) as the scenario's client: one connection, driven one command a
// line on stdin by tests/test_more_drivers.py, one JSON reply a line on stdout.
// Commands as in pg8000_scenario.py: query SQL | begin | commit | rollback |
// notifications MS N | quit. Connection: PGHOST, PGPORT, PGDATABASE, PGUSER,
// PGPASSWORD (which pg reads itself). The pg module is found through NODE_PATH
// (.venv/node/node_modules, installed by bin/setup).
'use strict';

const { Client } = require('pg');
const readline = require('readline');

const notes = [];

async function handle(client, line) {
  const sp = line.indexOf(' ');
  const op = sp < 0 ? line : line.slice(0, sp);
  const arg = sp < 0 ? '' : line.slice(sp + 1);
  switch (op) {
    case 'query': {
      // No parameters: pg sends a simple Query, as most node code does.
      const res = await client.query({ text: arg, rowMode: 'array' });
      return res.fields.length && res.rows.length ? res.rows[0][0] : null;
    }
    case 'begin':
    case 'commit':
    case 'rollback':
      // node-postgres has no transaction API of its own: applications send these.
      await client.query(op.toUpperCase());
      return null;
    case 'notifications': {
      // Notifications arrive as 'notification' events whenever the socket has them.
      const [waitMs, want] = arg.split(' ').map(Number);
      const deadline = Date.now() + waitMs;
      while (notes.length < want && Date.now() < deadline) {
        await new Promise((resolve) => setTimeout(resolve, 20));
      }
      return notes.splice(0, notes.length);
    }
    default:
      throw new Error(`unknown command ${op}`);
  }
}

async function main() {
  const client = new Client({ connectionTimeoutMillis: 20000, query_timeout: 30000 });
  client.on('notification', (m) => notes.push([m.channel, m.payload]));
  await client.connect();
  const rl = readline.createInterface({ input: process.stdin, terminal: false });
  try {
    for await (const line of rl) {
      if (line === 'quit') break;
      let reply;
      try {
        reply = { value: await handle(client, line) };
      } catch (err) {
        reply = { error: `${err.name}: ${err.message}` };
      }
      process.stdout.write(JSON.stringify(reply) + '\n');
    }
  } finally {
    rl.close();
    await client.end();
  }
}

main().catch((err) => {
  process.stderr.write(`node_scenario: ${err.stack || err}\n`);
  process.exit(1);
});
