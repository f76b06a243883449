package oss

// This file is the only one that knows the AWS SDK (aws-sdk-go-v2,
// service/s3). Moving to another SDK touches it alone.

import (
	"context"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net/http"
	"net/url"
	"strings"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/aws/ratelimit"
	"github.com/aws/aws-sdk-go-v2/aws/retry"
	awshttp "github.com/aws/aws-sdk-go-v2/aws/transport/http"
	"github.com/aws/aws-sdk-go-v2/credentials"
	"github.com/aws/aws-sdk-go-v2/service/s3"
	"github.com/aws/smithy-go"

	"github.com/comfyfarm/comfyfarm/schema"
)

// S3Config configures an S3 store.
type S3Config struct {
	// Endpoint is the service's base URL: "https://s3.us-east-1.amazonaws.com",
	// "https://<account>.r2.cloudflarestorage.com",
	// "https://oss-cn-hangzhou.aliyuncs.com", "http://127.0.0.1:9000" (MinIO).
	Endpoint string
	// Region signs requests (default "us-east-1"; R2 wants "auto").
	Region          string
	Bucket          string
	AccessKeyID     string
	SecretAccessKey string
	// PathStyle addresses endpoint/bucket/key instead of bucket.endpoint/key
	// (MinIO and most self-hosted servers want it).
	PathStyle bool
	// PublicBaseURL (a CDN or public bucket domain) is what URL returns keys
	// under when SignURLs is off.
	PublicBaseURL string
	// SignURLs makes URL return presigned GET URLs valid for URLTTL (default
	// 1h, at most 7 days: the SigV4 limit).
	SignURLs bool
	URLTTL   time.Duration
	// MaxRetries is how many times a failed request is retried (default 5;
	// negative: never). RetryBase is the first back-off (default 200ms); it
	// doubles each retry, with ±50% jitter, up to 64 × RetryBase.
	MaxRetries int
	RetryBase  time.Duration
	// HTTPTimeout bounds connecting, waiting for response headers, and each
	// read or write on the connection (default 60s).
	HTTPTimeout time.Duration
	// HTTPClient, when set, replaces the client built from HTTPTimeout.
	HTTPClient *http.Client
}

// MaxPresignTTL is the longest validity a SigV4 presigned URL may have.
const MaxPresignTTL = 7 * 24 * time.Hour

// S3 is a Store on an S3 bucket (AWS, MinIO, Cloudflare R2, Aliyun OSS's S3
// endpoint, ...). Retries are the SDK's standard retryer's (5xx, throttling,
// connection failures), with the back-off above and no client-side retry
// quota.
type S3 struct {
	client   *s3.Client
	presign  *s3.PresignClient
	cfg      S3Config
	spoolMax int64  // non-seekable bodies above this many bytes are spooled to disk
	tmpDir   string // where spooled bodies go ("" = os.TempDir)
}

// NewS3 builds an S3 store. It sends no request; use Ping to check the
// bucket.
func NewS3(cfg S3Config) (*S3, error) {
	u, err := url.Parse(cfg.Endpoint)
	switch {
	case cfg.Endpoint == "":
		return nil, errors.New("s3: endpoint is empty")
	case err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "":
		return nil, fmt.Errorf("s3: endpoint %q is not an http(s) URL", cfg.Endpoint)
	case cfg.Bucket == "":
		return nil, errors.New("s3: bucket is empty")
	case cfg.AccessKeyID == "" || cfg.SecretAccessKey == "":
		return nil, errors.New("s3: access key id and secret access key are required")
	case !cfg.SignURLs && cfg.PublicBaseURL == "":
		return nil, errors.New("s3: public_base_url is required when sign_urls is off")
	case cfg.URLTTL > MaxPresignTTL:
		return nil, fmt.Errorf("s3: url_ttl %s is longer than %s", cfg.URLTTL, MaxPresignTTL)
	}
	if cfg.Region == "" {
		cfg.Region = "us-east-1"
	}
	if cfg.URLTTL <= 0 {
		cfg.URLTTL = time.Hour
	}
	cfg.URLTTL = max(cfg.URLTTL, time.Second) // presigned URLs count whole seconds
	if cfg.MaxRetries == 0 {
		cfg.MaxRetries = defaultRetries
	}
	if cfg.RetryBase <= 0 {
		cfg.RetryBase = defaultRetryBase
	}
	if cfg.HTTPTimeout <= 0 {
		cfg.HTTPTimeout = defaultTimeout
	}
	hc := cfg.HTTPClient
	if hc == nil {
		hc = newHTTPClient(cfg.HTTPTimeout)
	}
	base := cfg.RetryBase
	retryer := retry.NewStandard(func(o *retry.StandardOptions) {
		o.MaxAttempts = max(cfg.MaxRetries, 0) + 1
		o.MaxBackoff = 64 * base
		o.RateLimiter = ratelimit.None
		o.Backoff = retry.BackoffDelayerFunc(func(attempt int, _ error) (time.Duration, error) {
			d := min(base<<min(attempt-1, 6), 64*base)
			return d/2 + rand.N(d), nil // d ± 50%
		})
	})
	client := s3.New(s3.Options{
		Region:       cfg.Region,
		BaseEndpoint: aws.String(strings.TrimRight(cfg.Endpoint, "/")),
		UsePathStyle: cfg.PathStyle,
		Credentials:  credentials.NewStaticCredentialsProvider(cfg.AccessKeyID, cfg.SecretAccessKey, ""),
		HTTPClient:   hc,
		Retryer:      retryer,
		// Only the checksums S3 requires: many S3-compatible services refuse
		// the newer default CRC trailers (aws-chunked bodies).
		RequestChecksumCalculation: aws.RequestChecksumCalculationWhenRequired,
		ResponseChecksumValidation: aws.ResponseChecksumValidationWhenRequired,
	})
	return &S3{client: client, presign: s3.NewPresignClient(client), cfg: cfg, spoolMax: spoolThreshold}, nil
}

// Put uploads the object in one PutObject with an explicit Content-Type and
// Content-Length. A seekable body is streamed from where it stands (the SDK
// rewinds it to retry, and over plain HTTP reads it once more to sign its
// SHA-256); anything else is first copied, to memory up to 4 MiB, else to a
// temporary file.
func (s *S3) Put(ctx context.Context, key string, r io.Reader, size int64, contentType string) error {
	if err := ValidKey(key); err != nil {
		return err
	}
	contentType = contentTypeFor(key, contentType)
	body, err := newReplayBody(r, size, s.spoolMax, s.tmpDir)
	if err != nil {
		return fmt.Errorf("s3 put %s: %w", key, err)
	}
	defer body.Close()
	w := body.window()
	defer w.stop()
	_, err = s.client.PutObject(ctx, &s3.PutObjectInput{
		Bucket:        aws.String(s.cfg.Bucket),
		Key:           aws.String(key),
		Body:          w,
		ContentLength: aws.Int64(body.size),
		ContentType:   aws.String(contentType),
	})
	return s.wrap("put", key, err)
}

// Get downloads the object. Opening is retried; the body is not.
func (s *S3) Get(ctx context.Context, key string) (io.ReadCloser, ObjectInfo, error) {
	if err := ValidKey(key); err != nil {
		return nil, ObjectInfo{}, err
	}
	out, err := s.client.GetObject(ctx, &s3.GetObjectInput{Bucket: aws.String(s.cfg.Bucket), Key: aws.String(key)})
	if err != nil {
		return nil, ObjectInfo{}, s.wrap("get", key, err)
	}
	info := ObjectInfo{Size: -1, ContentType: aws.ToString(out.ContentType), ETag: normalETag(aws.ToString(out.ETag))}
	if out.ContentLength != nil {
		info.Size = *out.ContentLength
	}
	return out.Body, info, nil
}

// normalETag gives an S3 ETag the form the other stores use: unquoted,
// upper-case hex.
func normalETag(etag string) string {
	return strings.ToUpper(strings.Trim(etag, `"`))
}

// Delete removes the object; S3 answers 204 for a missing key too.
func (s *S3) Delete(ctx context.Context, key string) error {
	if err := ValidKey(key); err != nil {
		return err
	}
	_, err := s.client.DeleteObject(ctx, &s3.DeleteObjectInput{Bucket: aws.String(s.cfg.Bucket), Key: aws.String(key)})
	if err = s.wrap("delete", key, err); errors.Is(err, schema.ErrNotFound) {
		return nil
	}
	return err
}

// URL returns a presigned GET URL when SignURLs is set, else PublicBaseURL +
// key. Presigning is local: no request is sent.
func (s *S3) URL(ctx context.Context, key string) (string, error) {
	if err := ValidKey(key); err != nil {
		return "", err
	}
	if !s.cfg.SignURLs {
		return joinURL(s.cfg.PublicBaseURL, key), nil
	}
	req, err := s.presign.PresignGetObject(ctx, &s3.GetObjectInput{Bucket: aws.String(s.cfg.Bucket), Key: aws.String(key)},
		s3.WithPresignExpires(s.cfg.URLTTL))
	if err != nil {
		return "", fmt.Errorf("s3 sign %s: %w", key, err)
	}
	return req.URL, nil
}

// Ping sends HeadBucket once: it proves endpoint, bucket, credentials and
// clock (the key needs s3:ListBucket on the bucket).
func (s *S3) Ping(ctx context.Context) error {
	_, err := s.client.HeadBucket(ctx, &s3.HeadBucketInput{Bucket: aws.String(s.cfg.Bucket)}, func(o *s3.Options) {
		o.Retryer = retry.AddWithMaxAttempts(o.Retryer, 1)
	})
	if err == nil {
		return nil
	}
	switch httpStatus(err) {
	case http.StatusNotFound:
		return fmt.Errorf("s3 ping: bucket %q does not exist at %s", s.cfg.Bucket, s.cfg.Endpoint)
	case http.StatusForbidden:
		return fmt.Errorf("s3 ping: access to bucket %q denied (check access_key_id, secret_access_key, region, the clock, and that the key may s3:ListBucket): %w", s.cfg.Bucket, err)
	case http.StatusMovedPermanently, http.StatusBadRequest:
		return fmt.Errorf("s3 ping: bucket %q refused the request (wrong region or path_style?): %w", s.cfg.Bucket, err)
	}
	return fmt.Errorf("s3 ping %s: %w", s.cfg.Bucket, err)
}

// wrap turns NoSuchKey into schema.ErrNotFound and names the operation.
func (s *S3) wrap(op, key string, err error) error {
	if err == nil {
		return nil
	}
	var ae smithy.APIError
	if errors.As(err, &ae) && ae.ErrorCode() == "NoSuchKey" {
		return fmt.Errorf("%w: %s", schema.ErrNotFound, key)
	}
	return fmt.Errorf("s3 %s %s: %w", op, key, err)
}

// httpStatus is the status of the answer that failed err, 0 if none came.
func httpStatus(err error) int {
	var re *awshttp.ResponseError
	if errors.As(err, &re) {
		return re.HTTPStatusCode()
	}
	return 0
}

var _ Store = (*S3)(nil)
