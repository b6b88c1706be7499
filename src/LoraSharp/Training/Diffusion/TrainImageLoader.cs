using SkiaSharp;
using static TorchSharp.torch;

namespace LoraSharp.Training.Diffusion;

/// <summary>Why an image cannot be used.</summary>
public enum ImageProblem { None, Unreadable, Tiny, Cmyk, Transparent }

/// <summary>The size and problems of an image file, from its header and pixels.</summary>
public sealed record ImageCheck(string Path, int Width, int Height, ImageProblem Problem, string? Detail)
{
    public bool Ok => Problem == ImageProblem.None;
    public override string ToString() => Ok ? $"{Path}: {Width}x{Height}" : $"{Path}: {Problem}: {Detail}";
}

/// <summary>
/// Reads training images with SkiaSharp (PNG, JPEG, WebP, BMP), checks them (unreadable, smaller than the minimum side,
/// CMYK JPEG, transparent pixels), resizes them to cover their bucket and center-crops (kohya's rule), and returns
/// tensors in [−1, 1].
/// </summary>
public static class TrainImageLoader
{
    /// <summary>Checks an image: decodes it fully (so truncated files are caught).</summary>
    public static ImageCheck Check(string path, int minSide)
    {
        try
        {
            if (IsCmykJpeg(path)) return Bad(ImageProblem.Cmyk, "CMYK JPEG (convert it to RGB)");
            using var bmp = Decode(path);
            if (bmp is null) return Bad(ImageProblem.Unreadable, "not a readable PNG/JPEG/WebP/BMP image");
            if (bmp.Width < minSide || bmp.Height < minSide)
                return new ImageCheck(path, bmp.Width, bmp.Height, ImageProblem.Tiny, $"{bmp.Width}x{bmp.Height} is smaller than {minSide} px");
            if (HasTransparency(bmp))
                return new ImageCheck(path, bmp.Width, bmp.Height, ImageProblem.Transparent, "has transparent pixels (flatten it onto a background)");
            return new ImageCheck(path, bmp.Width, bmp.Height, ImageProblem.None, null);
        }
        catch (IOException e) { return Bad(ImageProblem.Unreadable, e.Message); }
        ImageCheck Bad(ImageProblem p, string d) => new(path, 0, 0, p, d);
    }

    static SKBitmap? Decode(string path)
    {
        using var codec = SKCodec.Create(path);
        if (codec is null) return null;
        var info = new SKImageInfo(codec.Info.Width, codec.Info.Height, SKColorType.Rgba8888, SKAlphaType.Unpremul);
        var bmp = new SKBitmap(info);
        var result = codec.GetPixels(info, bmp.GetPixels());
        if (result is not (SKCodecResult.Success or SKCodecResult.IncompleteInput) || result == SKCodecResult.IncompleteInput)
        {
            bmp.Dispose();
            return null;
        }
        return bmp;
    }

    static unsafe bool HasTransparency(SKBitmap bmp)
    {
        var span = new ReadOnlySpan<byte>((void*)bmp.GetPixels(), bmp.ByteCount);
        for (int i = 3; i < span.Length; i += 4)
            if (span[i] != 255) return true;
        return false;
    }

    /// <summary>True for a JPEG whose frame header declares 4 components (CMYK / YCCK).</summary>
    public static bool IsCmykJpeg(string path)
    {
        using var f = File.OpenRead(path);
        if (f.ReadByte() != 0xFF || f.ReadByte() != 0xD8) return false;
        while (true)
        {
            int b = f.ReadByte();
            while (b == 0xFF) b = f.ReadByte();
            if (b < 0) return false;
            int marker = b;
            if (marker is 0xD8 or 0x01 || marker is >= 0xD0 and <= 0xD7) continue;
            int hi = f.ReadByte(), lo = f.ReadByte();
            if (hi < 0 || lo < 0) return false;
            int len = (hi << 8) | lo;
            bool sof = marker is >= 0xC0 and <= 0xCF && marker is not (0xC4 or 0xC8 or 0xCC);
            if (sof)
            {
                var hdr = new byte[6];
                if (f.Read(hdr, 0, 6) < 6) return false;
                return hdr[5] == 4;
            }
            if (marker == 0xDA) return false;
            f.Seek(len - 2, SeekOrigin.Current);
        }
    }

    /// <summary>Loads an image, resizes it to cover the bucket and center-crops: [3, H, W] float32 in [−1, 1] (on CPU).</summary>
    public static Tensor LoadForBucket(string path, BucketPlacement p)
    {
        using var bmp = Decode(path) ?? throw new LoraSharpException("not a readable image", path);
        using var resized = bmp.Resize(new SKImageInfo(p.ResizedWidth, p.ResizedHeight, SKColorType.Rgba8888, SKAlphaType.Unpremul),
            new SKSamplingOptions(SKCubicResampler.Mitchell))
            ?? throw new LoraSharpException($"could not resize to {p.ResizedWidth}x{p.ResizedHeight}", path);
        var rgb = new byte[p.BucketHeight * p.BucketWidth * 3];
        unsafe
        {
            byte* src = (byte*)resized.GetPixels();
            int stride = resized.RowBytes;
            for (int y = 0; y < p.BucketHeight; y++)
            {
                byte* row = src + (long)(y + p.CropTop) * stride + p.CropLeft * 4;
                int o = y * p.BucketWidth * 3;
                for (int x = 0; x < p.BucketWidth; x++)
                {
                    rgb[o + 3 * x] = row[4 * x];
                    rgb[o + 3 * x + 1] = row[4 * x + 1];
                    rgb[o + 3 * x + 2] = row[4 * x + 2];
                }
            }
        }
        using var scope = NewDisposeScope();
        var t = tensor(rgb, ScalarType.Byte).reshape(p.BucketHeight, p.BucketWidth, 3).permute(2, 0, 1).to_type(ScalarType.Float32);
        return (t / 127.5 - 1.0).contiguous().MoveToOuterDisposeScope();
    }
}
