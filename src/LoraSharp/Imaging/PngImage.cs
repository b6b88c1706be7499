using System.Runtime.InteropServices;
using SkiaSharp;
using TorchSharp;
using static TorchSharp.torch;

namespace LoraSharp.Imaging;

/// <summary>The value range of an image tensor.</summary>
public enum PixelRange
{
    /// <summary>[-1, 1], what the VAE decoder produces.</summary>
    MinusOneToOne,
    /// <summary>[0, 1].</summary>
    ZeroToOne,
}

/// <summary>Image tensors to PNG files (SkiaSharp), with A1111's generation parameters in a text chunk.</summary>
public static class PngImage
{
    /// <summary>
    /// Converts an image tensor [3, H, W] (or [1, 3, H, W]) to an opaque RGBA bitmap: values clamped to the range,
    /// scaled to 0..255 and rounded.
    /// </summary>
    public static SKBitmap ToBitmap(Tensor image, PixelRange range = PixelRange.MinusOneToOne)
    {
        if (image.dim() == 4 && image.shape[0] == 1) image = image[0];
        if (image.dim() != 3 || image.shape[0] != 3)
            throw new ArgumentException($"expected an image tensor [3, H, W], got [{string.Join(", ", image.shape)}]", nameof(image));
        int h = checked((int)image.shape[1]), w = checked((int)image.shape[2]);
        byte[] rgba;
        using (var scope = NewDisposeScope())
        {
            var x = image.detach().to_type(ScalarType.Float32);
            x = range == PixelRange.MinusOneToOne ? (x.clamp(-1, 1) + 1) * 127.5 : x.clamp(0, 1) * 255;
            var bytes = x.round().to_type(ScalarType.Byte);
            var alpha = full([1, h, w], 255, ScalarType.Byte, device: bytes.device);
            // Pixels must reach host memory to be encoded: the one transfer off the compute device.
            var hwc = cat([bytes, alpha], 0).permute(1, 2, 0).contiguous().to(DeviceType.CPU);
            rgba = hwc.data<byte>().ToArray();
        }
        var bitmap = new SKBitmap(new SKImageInfo(w, h, SKColorType.Rgba8888, SKAlphaType.Opaque));
        if (bitmap.RowBytes != w * 4)
            throw new InvalidOperationException($"unexpected bitmap row stride {bitmap.RowBytes} for width {w}");
        Marshal.Copy(rgba, 0, bitmap.GetPixels(), rgba.Length);
        bitmap.NotifyPixelsChanged();
        return bitmap;
    }

    /// <summary>Encodes a bitmap as PNG, with <paramref name="parameters"/> in a "parameters" text chunk when given.</summary>
    public static byte[] Encode(SKBitmap bitmap, GenerationParameters? parameters = null) =>
        Encode(bitmap, parameters?.ToInfotext());

    /// <summary>Encodes a bitmap as PNG, with raw infotext <paramref name="infotext"/> in a "parameters" chunk when given.</summary>
    public static byte[] Encode(SKBitmap bitmap, string? infotext)
    {
        using var data = bitmap.Encode(SKEncodedImageFormat.Png, 100)
            ?? throw new InvalidOperationException("SkiaSharp could not encode the bitmap as PNG");
        var png = data.ToArray();
        return infotext is null ? png : PngText.Insert(png, GenerationParameters.PngKeyword, infotext);
    }

    /// <summary>Encodes an image tensor as PNG (see <see cref="ToBitmap"/>).</summary>
    public static byte[] Encode(Tensor image, GenerationParameters? parameters = null, PixelRange range = PixelRange.MinusOneToOne)
    {
        using var bitmap = ToBitmap(image, range);
        return Encode(bitmap, parameters);
    }

    /// <summary>Writes an image tensor to a PNG file (atomically: a temporary file renamed over the target).</summary>
    public static void Save(Tensor image, string path, GenerationParameters? parameters = null, PixelRange range = PixelRange.MinusOneToOne) =>
        WriteAtomic(path, Encode(image, parameters, range));

    /// <summary>Writes a bitmap to a PNG file.</summary>
    public static void Save(SKBitmap bitmap, string path, GenerationParameters? parameters = null) =>
        WriteAtomic(path, Encode(bitmap, parameters));

    static void WriteAtomic(string path, byte[] bytes)
    {
        var full = Path.GetFullPath(path);
        var dir = Path.GetDirectoryName(full)!;
        Directory.CreateDirectory(dir);
        var tmp = Path.Combine(dir, $".{Path.GetFileName(full)}.{Environment.ProcessId}.tmp");
        File.WriteAllBytes(tmp, bytes);
        File.Move(tmp, full, overwrite: true);
    }

    /// <summary>Decodes a PNG (or any format SkiaSharp reads) into a bitmap.</summary>
    public static SKBitmap Load(string path)
    {
        if (!File.Exists(path)) throw new LoraSharpException("image file not found", path);
        return SKBitmap.Decode(path) ?? throw new LoraSharpException("not a readable image", path);
    }
}
