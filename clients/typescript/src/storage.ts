/** Storage: `processor.storage.save/upload/download/read/delete/list/files/signedUrl` on a product's storages. */
import { createHash } from "node:crypto";
import { duration, paged, ResourceClient, type CallOptions } from "./call.js";
import { fromServiceError } from "./errors.js";
import {
  SignedUrlMethod,
  StorageServiceClient,
  type FileInfo,
  type ListResponse,
  type UploadRequest,
} from "./gen/ductape/processor/v1/storage.js";

/** A storage's address: `event` is the storage's tag. */
export interface StorageAddress {
  product: string;
  env: string;
  event: string;
}

/** A file's content (Ductape's `{buffer, fileName, mimeType}`). */
export interface FileContent {
  data: Buffer;
  file: FileInfo;
  fileName: string;
  mimeType: string;
}

const UPLOAD_CHUNK_BYTES = 256 * 1024;

/** `processor.storage`: a product's files. */
export class StorageClient extends ResourceClient<StorageServiceClient> {
  /** Save a small file sent in one message. */
  async save(
    request: StorageAddress & {
      fileName: string;
      data: Uint8Array;
      contentType?: string;
      fileMetadata?: Record<string, string>;
      sha256?: string;
    },
    options?: CallOptions,
  ): Promise<FileInfo> {
    const response = await this.caller.unary(
      this.stub,
      this.stub.save,
      {
        product: request.product,
        env: request.env,
        event: request.event,
        fileName: request.fileName,
        contentType: request.contentType ?? "",
        data: Buffer.from(request.data),
        metadata: request.fileMetadata ?? {},
        sha256: request.sha256 ?? "",
      },
      options,
    );
    return response.file!;
  }

  /** Save a file of any size as a stream of chunks; nothing is kept if the stream fails. For bytes the size and
   * SHA-256 are declared for the server to check; for an (async) iterable of chunks pass them when known. */
  async upload(
    request: StorageAddress & {
      fileName: string;
      source: Uint8Array | Iterable<Uint8Array> | AsyncIterable<Uint8Array>;
      contentType?: string;
      fileMetadata?: Record<string, string>;
      sha256?: string;
      size?: number;
      chunkSize?: number;
    },
    options?: CallOptions,
  ): Promise<FileInfo> {
    let { sha256 = "", size = 0 } = request;
    const source = request.source;
    const chunkSize = request.chunkSize ?? UPLOAD_CHUNK_BYTES;
    if (source instanceof Uint8Array) {
      size ||= source.byteLength;
      sha256 ||= createHash("sha256").update(source).digest("hex");
    }
    let callError: unknown;
    const done = new Promise<FileInfo>((resolve, reject) => {
      const call = this.stub.upload(this.caller.metadata(options?.metadata), this.caller.streamOptions(options), (error, response) =>
        error ? reject(fromServiceError(error)) : resolve(response.file!),
      );
      const write = (message: UploadRequest) =>
        new Promise<void>((ok) => (call.write(message) ? ok() : call.once("drain", ok)));
      (async () => {
        await write({
          header: {
            product: request.product,
            env: request.env,
            event: request.event,
            fileName: request.fileName,
            contentType: request.contentType ?? "",
            metadata: request.fileMetadata ?? {},
            sha256,
            size,
          },
        });
        const chunks = source instanceof Uint8Array ? [source] : source;
        for await (const piece of chunks) {
          for (let at = 0; at < piece.byteLength; at += chunkSize) {
            await write({ chunk: Buffer.from(piece.subarray(at, at + chunkSize)) });
          }
        }
        call.end();
      })().catch((error) => {
        callError = error;
        call.cancel();
      });
    });
    try {
      return await done;
    } catch (error) {
      throw callError ?? error;
    }
  }

  /** Stream a file, or a byte range of it: resolves with its description and an async iterable of its chunks. */
  download(
    request: StorageAddress & { fileName: string; offset?: number; length?: number; chunkSize?: number },
    options?: CallOptions,
  ): Promise<{ file: FileInfo; chunks: AsyncIterable<Buffer> }> {
    const call = this.stub.download(
      {
        product: request.product,
        env: request.env,
        event: request.event,
        fileName: request.fileName,
        offset: request.offset ?? 0,
        length: request.length ?? 0,
        chunkSize: request.chunkSize ?? 0,
      },
      this.caller.metadata(options?.metadata),
      this.caller.streamOptions(options),
    );
    const iterator = call[Symbol.asyncIterator]();
    const chunks = async function* (): AsyncGenerator<Buffer> {
      try {
        for (;;) {
          const next = await iterator.next();
          if (next.done) return;
          if (next.value.chunk) yield next.value.chunk;
        }
      } catch (error) {
        throw fromServiceError(error as object);
      }
    };
    return iterator.next().then(
      (first) => {
        if (first.done || !first.value.file) throw fromServiceError({ code: 13, details: "the download sent no file description" });
        return { file: first.value.file, chunks: chunks() };
      },
      (error) => {
        throw fromServiceError(error as object);
      },
    );
  }

  /** Read a small file in one message (Ductape's `readFile`). */
  async read(request: StorageAddress & { fileName: string }, options?: CallOptions): Promise<FileContent> {
    const response = await this.caller.unary(this.stub, this.stub.read, request, options, true);
    const file = response.file!;
    return { data: response.data, file, fileName: file.fileName, mimeType: file.contentType };
  }

  /** Delete a file; resolves false when there was none. */
  async delete(request: StorageAddress & { fileName: string }, options?: CallOptions): Promise<boolean> {
    return (await this.caller.unary(this.stub, this.stub.delete, request, options)).deleted;
  }

  /** One page of files, in key order. */
  list(
    request: StorageAddress & { prefix?: string; pageSize?: number; pageToken?: string },
    options?: CallOptions,
  ): Promise<ListResponse> {
    return this.caller.unary(
      this.stub,
      this.stub.list,
      {
        product: request.product,
        env: request.env,
        event: request.event,
        prefix: request.prefix ?? "",
        pageSize: request.pageSize ?? 0,
        pageToken: request.pageToken ?? "",
      },
      options,
      true,
    );
  }

  /** Every file (under `prefix`), fetching pages as needed. */
  files(request: StorageAddress & { prefix?: string; pageSize?: number }, options?: CallOptions): AsyncGenerator<FileInfo> {
    return paged(async (pageToken) => {
      const page = await this.list({ ...request, pageToken }, options);
      return { items: page.files, nextPageToken: page.nextPageToken };
    });
  }

  /** A URL that reads (GET) or writes (PUT) one file without the processor's API, until it expires. */
  async signedUrl(
    request: StorageAddress & { fileName: string; method?: "GET" | "PUT"; expiresInMs?: number; contentType?: string },
    options?: CallOptions,
  ): Promise<{ url: string; method: "GET" | "PUT"; expireTime: Date | undefined; headers: Record<string, string> }> {
    const response = await this.caller.unary(
      this.stub,
      this.stub.signedUrl,
      {
        product: request.product,
        env: request.env,
        event: request.event,
        fileName: request.fileName,
        method: request.method === "PUT" ? SignedUrlMethod.SIGNED_URL_METHOD_PUT : SignedUrlMethod.SIGNED_URL_METHOD_GET,
        expiresIn: request.expiresInMs === undefined ? undefined : duration(request.expiresInMs),
        contentType: request.contentType ?? "",
      },
      options,
      true,
    );
    return {
      url: response.url,
      method: response.method === SignedUrlMethod.SIGNED_URL_METHOD_PUT ? "PUT" : "GET",
      expireTime: response.expireTime,
      headers: response.headers,
    };
  }
}
