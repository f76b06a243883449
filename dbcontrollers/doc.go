// Package dbcontrollers holds all of comfyfarm's SQL: the control database
// (the durable job queue and the registered nodes) and one database per
// frontend (its users, their credit ledger and their photos), on SQLite
// (embedded, pure Go, the default) or MySQL/MariaDB.
//
// # Databases
//
//	control   comfyfarm           jobs, nodes, webhooks, schema_migrations
//	frontend  comfyfarm_<name>    users, credit_ledger, photos, schema_migrations
//	          (SQLite: <path>/comfyfarm.db and <path>/<name>.db)
//
// OpenControl and OpenFrontend create a database when it is missing and apply
// the embedded migrations (schema/migrations, run by goose's Provider; MySQL
// files hold one change each because DDL commits implicitly). Migrations of
// one database run one at a time: a named server lock on MySQL, a
// per-file lock within the process on SQLite.
//
// Identifiers (job ids, user ids, idempotency keys, node names, object keys)
// compare byte for byte on both: SQLite's TEXT collation is binary, and on
// MySQL they are VARBINARY columns, because utf8mb4_bin pads with spaces
// ('bob ' = 'bob'). Since a byte column takes any bytes, the controllers
// check UTF-8 and refuse ids with white space at an end (schema.CheckIdent).
// SQLite files are created 0600.
//
// Times are stored in UTC with microseconds: DATETIME(6) on MySQL, fixed-width
// text on SQLite (so text order is time order). Driver errors are translated
// once, here: no rows is schema.ErrNotFound, a unique-key violation
// schema.ErrConflict.
//
// SQLite runs in WAL mode with busy_timeout and foreign keys on; every
// transaction begins IMMEDIATE, so a writer takes the lock up front and waits
// for the one writer before it rather than failing half-way. Readers never
// wait. Do not nest a transaction inside another on the same database.
//
// # The job queue
//
// A job moves through its states only by compare-and-set (JobUpdate with
// From), so two parts of the service, or two processes, cannot both move it:
//
//	         JobClaim, JobClaimNext                JobUpdate (compare and set)
//	queued ─────────────────────────► dispatched ──► running ──► storing ──► succeeded
//	  ▲  │   node, attempts+1, lease       │            │           │
//	  │  └─► cancelled                     └────────────┴───────────┴──► failed, cancelled
//	  │                                         lease expired: JobRescue
//	  └──────────────────────────────────── back to queued, or failed (node_lost) at max attempts
//
// Claiming is one short transaction. On MySQL the row is selected FOR UPDATE
// SKIP LOCKED (a worker skips a job another is claiming rather than wait) and
// then updated; on SQLite, which has one writer, a single UPDATE ... RETURNING
// guarded by state = 'queued' does it. The head of a queue is the highest
// priority, then the oldest, then the lowest id.
//
// An active job carries a lease (owner, expiry) that its owner extends with
// JobExtendLease. JobRescue finds expired leases; its updates repeat the
// expiry condition, so it is idempotent and needs no leader.
//
// # The webhook outbox
//
// When Store.WebhookURLFunc names an address for a job that JobUpdate or
// JobRescue has just moved to a final state, the same transaction inserts its
// row in webhooks (keyed by job and event, inserted only if absent), so the
// state and the promise to announce it commit together. WebhookClaim leases
// due rows to one deliverer (SKIP LOCKED at READ COMMITTED on MySQL, as the
// rescue; one UPDATE ... RETURNING on SQLite); WebhookRecord writes an
// attempt's result only for the lease's owner. See webhooks.go and package
// webhook.
//
// # Frontends
//
// Every frontend database has the same tables. A Controller is what the
// service needs from one: users, credits, photos. Base implements it for
// every frontend; a frontend with behaviour of its own embeds Base and
// overrides what differs:
//
//	generic  Base as it is
//	style    copies metadata "style" into the indexed photos.style column at
//	         insert; PhotoList filters on it; validates it at submit
//	         (MetadataValidator)
//	logo     keeps image/png only; new users start with LogoInitialCredits
//	         unless initial credits are configured
//
// Embedding is not virtual dispatch: a Base method never reaches an override,
// so each Base method stands alone, and an optional behaviour is an optional
// interface (MetadataValidator) the caller checks with a type assertion.
// Registry maps frontend names to controllers; a name is only a map key or a
// validated identifier, never spliced into SQL.
//
// Controller methods take the frontend's *DB or a transaction of it (InTx),
// so the caller can tie several changes together, e.g. a credit charge and a
// job insert, or the photos of a job and its success. Given the *DB, a
// multi-statement method runs in a transaction of its own.
//
// Credits never go below zero. Changes of one user are serialised on the
// user's row (SELECT ... FOR UPDATE on MySQL; the write lock on SQLite) and
// recorded in credit_ledger with the balance after them. An idempotency key
// is unique per user: a replay returns the original entry and changes
// nothing. A user is created the first time it is seen, with the frontend's
// initial credits recorded as the first ledger entry.
//
// Package dbtest gives other packages' tests both databases: SQLite in a
// temporary folder and MariaDB/MySQL (COMFYFARM_TEST_MYSQL_DSN) under a fresh
// database prefix.
package dbcontrollers
