// A minimal typed client of the comfyfarm HTTP API for a backend (Node 18+,
// Deno, Bun, or any runtime with fetch). The types follow /openapi.json;
// a generator such as openapi-typescript can produce the complete set from it.
//
//   const farm = new Farm("http://127.0.0.1:8080", process.env.COMFYFARM_API_KEY!);
//   const sub = await farm.submit({ user_id: "u-42", template: "portrait", inputs: { prompt: "a fox" } });
//   // hand sub.events_url to the browser (see follow.html), or wait here:
//   const job = await farm.wait(sub.id);
//   for (const o of job.outputs ?? []) console.log(o.url);
//   const page = await farm.photos({ user_id: "u-42" });

export type JobState =
  | "queued" | "dispatched" | "running" | "storing"
  | "succeeded" | "failed" | "cancelled";

export const terminalStates: readonly JobState[] = ["succeeded", "failed", "cancelled"];

export interface Progress { node_id: string; value: number; max: number; percent: number }

export interface Output {
  photo_id: number; url: string; content_type: string;
  width: number; height: number; bytes: number; filename: string; node_id: string;
}

export interface JobError {
  code: string; message: string; node_id?: string; node_type?: string;
  details?: Record<string, unknown> | null;
}

export interface Job {
  id: string; frontend: string; user_id: string; state: JobState; priority: number;
  template?: string; metadata?: unknown; node: string; attempts: number; position: number;
  progress: Progress | null; outputs: Output[] | null; error: JobError | null;
  created_at: string; dispatched_at: string | null; started_at: string | null; finished_at: string | null;
  events_url?: string;
}

/** The body of POST /api/v1/jobs: a raw API-format workflow, or a template and its inputs. */
export interface SubmitRequest {
  user_id: string;
  frontend?: string; // needed with the admin key only
  workflow?: Record<string, unknown>;
  template?: string; // "name" or "name@version"
  inputs?: Record<string, string | number | boolean>;
  priority?: number; // -100..100
  metadata?: Record<string, unknown>;
  webhook_url?: string;
  requirements?: { tags?: string[]; min_vram_gb?: number };
}

export interface Submitted { id: string; state: JobState; position: number; events_url: string }

export interface Photo {
  id: number; user_id: string; job_id: string; output_index: number; url: string;
  content_type: string; width: number; height: number; bytes: number; sha256: string;
  node: string; metadata: unknown; created_at: string;
}

export interface PhotoPage { photos: Photo[]; total: number; page: number; limit: number }

/** Every error answer is {"error":{"code","message","details"}}. */
export class FarmError extends Error {
  readonly status: number;
  readonly code: string;
  readonly details: Record<string, unknown>;
  constructor(status: number, code: string, message: string, details: Record<string, unknown>) {
    super(`${status} ${code}: ${message}`);
    this.status = status;
    this.code = code;
    this.details = details;
  }
}

export class Farm {
  private readonly base: string;
  private readonly key: string;

  constructor(base: string, key: string) {
    this.base = base.replace(/\/+$/, "");
    this.key = key;
  }

  private async call<T>(method: string, path: string, body?: unknown, headers: Record<string, string> = {}): Promise<T> {
    const res = await fetch(this.base + path, {
      method,
      headers: {
        Authorization: `Bearer ${this.key}`,
        ...(body === undefined ? {} : { "Content-Type": "application/json" }),
        ...headers,
      },
      body: body === undefined ? undefined : JSON.stringify(body),
    });
    const text = await res.text();
    const data = text ? JSON.parse(text) : undefined;
    if (!res.ok) {
      const e = data?.error ?? {};
      throw new FarmError(res.status, e.code ?? "http_error", e.message ?? res.statusText, e.details ?? {});
    }
    return data as T;
  }

  /** Queues a job. The idempotency key makes a retried submit return the same job. */
  submit(req: SubmitRequest, idempotencyKey?: string): Promise<Submitted> {
    const h: Record<string, string> = idempotencyKey ? { "Idempotency-Key": idempotencyKey } : {};
    return this.call<Submitted>("POST", "/api/v1/jobs", req, h);
  }

  /** The job view. */
  get(id: string): Promise<Job> {
    return this.call<Job>("GET", `/api/v1/jobs/${encodeURIComponent(id)}`);
  }

  /**
   * Waits for the job to finish: the server holds each request for up to
   * `perRequestSeconds` (at most 120) and answers at once when the job ends,
   * so this costs one request per interval, not a poll loop.
   */
  async wait(id: string, opts: { timeoutSeconds?: number; perRequestSeconds?: number } = {}): Promise<Job> {
    const deadline = Date.now() + (opts.timeoutSeconds ?? 600) * 1000;
    const per = Math.min(opts.perRequestSeconds ?? 60, 120);
    for (;;) {
      const left = Math.ceil((deadline - Date.now()) / 1000);
      const job = await this.call<Job>("GET", `/api/v1/jobs/${encodeURIComponent(id)}?wait=${Math.max(1, Math.min(per, left))}s`);
      if (terminalStates.includes(job.state)) return job;
      if (Date.now() >= deadline) throw new Error(`job ${id} still ${job.state} after the timeout`);
    }
  }

  /** Cancels a job; FarmError 409 job_terminal when it had already finished. */
  cancel(id: string): Promise<Job> {
    return this.call<Job>("DELETE", `/api/v1/jobs/${encodeURIComponent(id)}`);
  }

  /** A page of photos, newest first (limit at most 100). */
  photos(q: { user_id?: string; page?: number; limit?: number } = {}): Promise<PhotoPage> {
    const p = new URLSearchParams();
    if (q.user_id) p.set("user_id", q.user_id);
    if (q.page) p.set("page", String(q.page));
    if (q.limit) p.set("limit", String(q.limit));
    const qs = p.toString();
    return this.call<PhotoPage>("GET", "/api/v1/photos" + (qs ? "?" + qs : ""));
  }
}
