package main

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"mime/multipart"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/comfyfarm/comfyfarm/dbcontrollers/dbtest"
	"github.com/comfyfarm/comfyfarm/oss/s3test"
	"github.com/comfyfarm/comfyfarm/schema"
)

// TestFullStackS3: with storage.kind s3, a job's input and outputs go to an
// S3 server that checks every signature, the outputs' presigned URLs
// download what the node wrote, /readyz pings the bucket, and deleting a
// photo deletes its object.
func TestFullStackS3(t *testing.T) {
	srv := s3test.Start(t, s3test.Options{Region: "eu-central-1"})
	s := startStack(t, dbtest.SQLite(t),
		"COMFYFARM_STORAGE_KIND=s3",
		"COMFYFARM_STORAGE_S3_ENDPOINT="+srv.Endpoint(),
		"COMFYFARM_STORAGE_S3_REGION="+srv.Region(),
		"COMFYFARM_STORAGE_S3_BUCKET="+srv.Bucket(),
		"COMFYFARM_STORAGE_S3_ACCESS_KEY_ID="+srv.AccessKeyID(),
		"COMFYFARM_STORAGE_S3_SECRET_ACCESS_KEY="+srv.SecretAccessKey(),
		"COMFYFARM_STORAGE_S3_PATH_STYLE=true",
		"COMFYFARM_STORAGE_S3_URL_TTL=10m",
	)
	var ready struct{ Checks map[string]string }
	s.getJSON("/readyz", "", &ready)
	if ready.Checks["storage"] != "ok" {
		t.Fatalf("readyz: %+v", ready)
	}

	var body bytes.Buffer
	mw := multipart.NewWriter(&body)
	_ = mw.WriteField("frontend", "logo")
	_ = mw.WriteField("user_id", "u-s3")
	_ = mw.WriteField("workflow", e2eWorkflow)
	fw, _ := mw.CreateFormFile("images", "input.png")
	_, _ = fw.Write(pngBytes(t, 24, 16))
	_ = mw.Close()
	res, b := s.do("POST", "/api/v1/jobs", "logo-key", &body, mw.FormDataContentType())
	if res.StatusCode != http.StatusAccepted {
		t.Fatalf("submit: %d %s", res.StatusCode, b)
	}
	var sub struct{ ID string }
	_ = json.Unmarshal(b, &sub)
	deadline := time.Now().Add(30 * time.Second)
	var job schema.Job
	for {
		s.getJSON("/api/v1/jobs/"+sub.ID+"?frontend=logo", "logo-key", &job)
		if job.State.Terminal() || time.Now().After(deadline) {
			break
		}
		time.Sleep(50 * time.Millisecond)
	}
	if job.State != schema.JobSucceeded || len(job.Outputs) != 2 {
		t.Fatalf("job %s: %+v %+v", job.State, job.Error, job.Outputs)
	}
	bucketURL := srv.Endpoint() + "/" + srv.Bucket() + "/"
	for _, o := range job.Outputs {
		if !strings.HasPrefix(o.URL, bucketURL) || !strings.Contains(o.URL, "X-Amz-Signature=") || !strings.Contains(o.URL, "X-Amz-Expires=600") {
			t.Fatalf("output URL %s is not a presigned URL on the bucket", o.URL)
		}
		res, err := http.Get(o.URL)
		if err != nil {
			t.Fatal(err)
		}
		got, _ := io.ReadAll(res.Body)
		res.Body.Close()
		if res.StatusCode != 200 || res.Header.Get("Content-Type") != "image/png" || int64(len(got)) != o.Bytes || !nodeHasFile(s.fakes, got) {
			t.Fatalf("GET %s: %d %s, %d bytes not from the node", o.URL, res.StatusCode, res.Header.Get("Content-Type"), len(got))
		}
	}
	var puts int
	for _, r := range srv.Requests() {
		if r.Status >= 300 {
			t.Errorf("S3 refused %+v", r)
		}
		if r.Method == http.MethodPut {
			puts++
			if r.Auth != "header" || !strings.HasPrefix(r.Key, "logo/") {
				t.Errorf("upload %+v", r)
			}
		}
	}
	if puts < 2 {
		t.Fatalf("%d uploads", puts)
	}

	// Deleting a photo deletes its object.
	var list struct {
		Photos []schema.Photo `json:"photos"`
	}
	s.getJSON("/api/v1/photos?frontend=logo&user_id=u-s3", "logo-key", &list)
	if len(list.Photos) != 2 {
		t.Fatalf("photos %+v", list)
	}
	p := list.Photos[0]
	key := strings.TrimPrefix(strings.SplitN(p.URL, "?", 2)[0], bucketURL)
	if _, ok := srv.Object(key); !ok {
		t.Fatalf("no object %q behind %s", key, p.URL)
	}
	res, b = s.do("DELETE", fmt.Sprintf("/api/v1/photos/%d?frontend=logo", p.ID), "logo-key", nil, "")
	if res.StatusCode/100 != 2 {
		t.Fatalf("delete: %d %s", res.StatusCode, b)
	}
	if _, ok := srv.Object(key); ok {
		t.Fatalf("object %q still there", key)
	}
}
