// Package oss stores comfyfarm's outputs: a small Store interface with three
// backends, local disk (the default), Aliyun OSS and S3-compatible services,
// plus the media checks that
// decide what a file is before it is stored or sent to a node.
//
// # Keys
//
// Every key passes ValidKey: UTF-8, no control characters or backslashes, no
// leading "/", "/"-separated segments that are non-empty and do not start with
// "." (so no "." or ".." and no hidden names), at most 1023 bytes. Job outputs
// use ObjectKey: <frontend>/<yyyy>/<mm>/<dd>/<job_id>/<index>.<ext>. The
// database stores the key; URL builds the link when it is read.
//
// # Local
//
// Local keeps object "a/b.png" at Dir/a/b.png, so Dir can be served or
// inspected as is. Writes go to Dir/.tmp, are synced, and renamed into place;
// the content type and ETag (MD5, as OSS computes it for a simple upload) sit
// in a sidecar under Dir/.meta, trusted only while its size matches the file.
// Every access goes through an os.Root on Dir, and symbolic links are refused,
// so a key cannot reach outside Dir. With URL signing on, URL returns
//
//	BaseURL + escaped key + "?expires=<unix>&signature=<hex HMAC-SHA256(secret, key \n expires)>"
//
// and the server's /files/{key} route calls Verify (errors match
// schema.ErrForbidden: 403) and then Open.
//
// # Aliyun
//
// Aliyun wraps the v1 SDK (github.com/aliyun/aliyun-oss-go-sdk), confined to
// aliyun.go. The SDK picks the addressing from the endpoint: virtual-hosted
// (bucket.endpoint/key) on a host name, path style (endpoint/bucket/key) on
// an IP. Requests are signed V1 (HMAC-SHA1) by default or V4
// (OSS4-HMAC-SHA256) with a region; URL returns SDK-signed GET URLs, or
// PublicBaseURL + key when signing is off.
//
// The v1 SDK never retries, so Aliyun does: on a 5xx (XML or not),
// RequestTimeTooSkewed, a CRC mismatch or a connection failure it backs off
// exponentially (RetryBase doubling, ±50% jitter, capped at 64 × RetryBase)
// up to MaxRetries times, while the context lasts. Other 4xx answers are final.
// Each attempt re-sends the body from its start: a seekable reader is rewound;
// anything else is first copied to memory (up to 4 MiB) or to an unlinked
// temporary file. Every upload carries an explicit Content-Type and
// Content-Length (never chunked). Downloads are checked against the CRC-64
// OSS reports. Ping reads a key that never exists: NoSuchKey proves endpoint,
// bucket, credentials and clock, with read permission alone.
//
// # S3
//
// S3 wraps the AWS SDK for Go v2 (service/s3), confined to s3.go, for any
// S3-compatible service. PathStyle picks endpoint/bucket/key over
// bucket.endpoint/key. Requests are signed SigV4 with static credentials.
// Put is one PutObject with Content-Type and Content-Length: a seekable body
// is handed to the SDK through a window over its bytes (the SDK seeks it to
// hash the payload over plain HTTP and to rewind for a retry; the window
// serialises reads and seeks and refuses reads once Put returns); anything
// else is first copied as for Aliyun. The SDK's standard retryer retries 5xx,
// throttling and connection failures with the same back-off as Aliyun's and
// no client-side retry quota. Only checksums S3 requires are sent, as several
// S3-compatible services refuse the newer CRC trailers. ETags are returned
// unquoted and upper-case, as the other stores return them. URL presigns a
// GET locally (SigV4, at most 7 days) or joins PublicBaseURL and the key.
// Ping is one HeadBucket: 404 is reported as a missing bucket, 403 as
// refused credentials or permissions.
//
// # Media
//
// Sniff names a file by its magic bytes from a closed list (PNG, JPEG, GIF,
// WebP, AVIF, MP4/MOV/M4A, WebM/Matroska, MP3, WAV, FLAC, Ogg, glTF binary;
// anything else is application/octet-stream, "bin"). ImageInfo reads only an
// image header (PNG, JPEG, GIF, WebP) for its dimensions. CheckInputImage
// admits uploaded inputs: PNG, JPEG or WebP only, within a byte limit, and
// within a pixel limit checked from the header before anything is decoded,
// which stops decompression bombs.
//
// # Testing
//
// Package osstest is a fake OSS server that checks signatures, expiry and
// clock skew as OSS does and injects faults; the conformance suite in this
// package's tests runs against Local and against Aliyun (V1 and V4) on it.
// Package s3test runs gofakes3, a real S3 implementation, behind a front that
// checks SigV4 signatures, presigned URL expiry and clock skew; the suite runs
// against S3 on it in path and virtual-host style and with public URLs.
package oss
