// Package s3test is an S3 server for tests: the gofakes3 implementation
// (github.com/johannesboyne/gofakes3) with an in-memory backend, on an
// httptest server at 127.0.0.1, behind a front that authenticates every
// request the way S3 does.
//
// gofakes3 itself accepts any request, signed or not. The front checks AWS
// Signature Version 4, in the Authorization header and in presigned URLs, by
// rebuilding the request from the parts the client says it signed and signing
// it again with the known secret through the SDK's own signer
// (github.com/aws/aws-sdk-go-v2/aws/signer/v4): access key id, credential
// scope (date, region, service "s3"), signature, clock skew (15 minutes),
// expiry of presigned URLs, and, when x-amz-content-sha256 names a hash
// rather than UNSIGNED-PAYLOAD, the body against that hash. Refusals are S3
// XML errors: SignatureDoesNotMatch, InvalidAccessKeyId, AccessDenied
// ("Request has expired" for old URLs, or no credentials at all),
// RequestTimeTooSkewed, AuthorizationHeaderMalformed,
// XAmzContentSHA256Mismatch.
//
// Addressing: path style (http://127.0.0.1:PORT/bucket/key) by default; with
// Options.VirtualHost, only virtual-hosted requests
// (http://bucket.localhost:PORT/key) are served, and a client must map
// *.localhost to the server's address itself (DialContext), as no resolver
// here does. Requests records which style each request used.
//
// Fault injection: FailNext answers the next requests with 503 SlowDown;
// SetSkew moves the server's clock.
package s3test
