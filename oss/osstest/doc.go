// Package osstest is a fake Aliyun OSS server for tests: an httptest server on
// 127.0.0.1 holding one bucket in memory, which the real v1 SDK
// (github.com/aliyun/aliyun-oss-go-sdk) talks to unchanged.
//
// It speaks PutObject, GetObject (with Range), HeadObject (also ?objectMeta),
// DeleteObject and GetBucketInfo, and it checks what OSS checks: V1
// (HMAC-SHA1) and V4 (OSS4-HMAC-SHA256) signatures in the Authorization header
// and in signed URLs, the access key id, the V4 credential scope, expiry of
// signed URLs and clock skew (15 minutes). Refusals are OSS XML errors:
// SignatureDoesNotMatch (with the StringToSign, as OSS sends it),
// InvalidAccessKeyId, AccessDenied ("Request has expired." for old URLs),
// RequestTimeTooSkewed, NoSuchKey, NoSuchBucket, InvalidDigest; HEAD errors
// travel base64-encoded in the x-oss-err header. Successful PUTs and GETs
// carry x-oss-hash-crc64ecma, which the SDK checks.
//
// Fault injection: FailNext (e.g. a storm of 503s), DropNext (closed
// connections), CorruptNextGet (a body that disagrees with its CRC), SetSkew
// (the server's clock). Requests and RequestCount show what arrived.
//
// Only path-style addressing (an IP endpoint) is served. V4 payload hashes
// other than UNSIGNED-PAYLOAD are accepted without being checked against the
// body; the v1 SDK never sends one.
package osstest
