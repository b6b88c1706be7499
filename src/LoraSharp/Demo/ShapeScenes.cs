using System.Globalization;
using SkiaSharp;
using static TorchSharp.torch;

namespace LoraSharp.Demo;

/// <summary>The shapes the demo generator draws. <see cref="Star"/> is held out of the base model's pretraining.</summary>
public enum DemoShape { Circle, Square, Triangle, Star }

/// <summary>One procedurally drawn scene: a filled shape of one colour on a flat background, at one of five positions.</summary>
public sealed record ShapeScene(DemoShape Shape, string Colour, string Background, string Position, float Size, float JitterX, float JitterY, float Rotation)
{
    /// <summary>The caption, e.g. "a red circle on a blue background, left"; <paramref name="shapeWords"/> replaces the shape's name (a trigger word).</summary>
    public string Caption(string? shapeWords = null) =>
        $"a {Colour} {shapeWords ?? ShapeScenes.ShapeName(Shape)} on a {Background} background, {Position}";
}

/// <summary>
/// The demo's procedural captioned image set (SkiaSharp): circles, squares and triangles (and the held-out star) in six
/// colours on eight backgrounds at five positions (center, top, bottom, left, right), drawn anti-aliased at any size. Everything is a function of the seed.
/// </summary>
public static class ShapeScenes
{
    public static readonly IReadOnlyDictionary<string, SKColor> Colours = new Dictionary<string, SKColor>(StringComparer.Ordinal)
    {
        ["red"] = new SKColor(220, 30, 30),
        ["green"] = new SKColor(40, 180, 60),
        ["blue"] = new SKColor(40, 70, 220),
        ["yellow"] = new SKColor(240, 210, 30),
        ["purple"] = new SKColor(150, 50, 190),
        ["orange"] = new SKColor(245, 130, 20),
    };

    public static readonly IReadOnlyDictionary<string, SKColor> Backgrounds = new Dictionary<string, SKColor>(StringComparer.Ordinal)
    {
        ["white"] = new SKColor(245, 245, 245),
        ["black"] = new SKColor(15, 15, 15),
        ["gray"] = new SKColor(128, 128, 128),
        ["blue"] = new SKColor(30, 50, 150),
        ["green"] = new SKColor(30, 120, 50),
        ["red"] = new SKColor(150, 30, 30),
        ["yellow"] = new SKColor(230, 220, 120),
        ["purple"] = new SKColor(90, 40, 120),
    };

    /// <summary>Positions and their centres as fractions of the image side.</summary>
    public static readonly IReadOnlyDictionary<string, (float X, float Y)> Positions = new Dictionary<string, (float, float)>(StringComparer.Ordinal)
    {
        ["center"] = (0.5f, 0.5f),
        ["top"] = (0.5f, 0.37f),
        ["bottom"] = (0.5f, 0.63f),
        ["left"] = (0.37f, 0.5f),
        ["right"] = (0.63f, 0.5f),
    };

    /// <summary>The shapes of the base model's pretraining set (the star is held out).</summary>
    public static readonly IReadOnlyList<DemoShape> PretrainingShapes = [DemoShape.Circle, DemoShape.Square, DemoShape.Triangle];

    public static string ShapeName(DemoShape s) => s.ToString().ToLowerInvariant();

    /// <summary>Every word a demo caption uses (for the demo tokenizer's vocabulary), plus the trigger word "sks".</summary>
    public static IEnumerable<string> Words() =>
        new[] { "a", "an", "on", "the", "of", "background", "sks", "shape", "photo", "image" }
            .Concat(Enum.GetValues<DemoShape>().Select(ShapeName))
            .Concat(Colours.Keys).Concat(Backgrounds.Keys)
            .Concat(Positions.Keys.SelectMany(p => p.Split(' ')))
            .Distinct(StringComparer.Ordinal);

    /// <summary>
    /// A random scene of <paramref name="shape"/> (shape colour and background always differ in hue); a given
    /// <paramref name="position"/> replaces the random one (the random draws are the same either way).
    /// </summary>
    public static ShapeScene Random(Random rng, DemoShape shape, string? position = null)
    {
        if (position is not null && !Positions.ContainsKey(position))
            throw new ArgumentException($"unknown position '{position}'; expected one of {string.Join(", ", Positions.Keys)}", nameof(position));
        var colours = Colours.Keys.ToArray();
        var colour = colours[rng.Next(colours.Length)];
        var backs = Backgrounds.Keys.Where(b => b != colour).ToArray();
        var back = backs[rng.Next(backs.Length)];
        var positions = Positions.Keys.ToArray();
        var pos = positions[rng.Next(positions.Length)];
        float size = 0.62f + 0.08f * (float)rng.NextDouble();
        float jx = (float)(rng.NextDouble() - 0.5) * 0.04f, jy = (float)(rng.NextDouble() - 0.5) * 0.04f;
        float rot = (float)(rng.NextDouble() - 0.5) * 20f;
        return new ShapeScene(shape, colour, back, position ?? pos, size, jx, jy, rot);
    }

    /// <summary>A random scene whose shape is one of <paramref name="shapes"/>.</summary>
    public static ShapeScene Random(Random rng, IReadOnlyList<DemoShape> shapes) => Random(rng, shapes[rng.Next(shapes.Count)]);

    /// <summary>Draws a scene into a new opaque RGBA bitmap of side <paramref name="size"/> (the caller owns it).</summary>
    public static SKBitmap Render(ShapeScene scene, int size)
    {
        var bmp = new SKBitmap(new SKImageInfo(size, size, SKColorType.Rgba8888, SKAlphaType.Opaque));
        using var canvas = new SKCanvas(bmp);
        canvas.Clear(Backgrounds[scene.Background]);
        using var paint = new SKPaint { Color = Colours[scene.Colour], IsAntialias = true, Style = SKPaintStyle.Fill };
        var (px, py) = Positions[scene.Position];
        float cx = (px + scene.JitterX) * size, cy = (py + scene.JitterY) * size;
        float r = scene.Size * size / 2;
        canvas.Save();
        canvas.Translate(cx, cy);
        canvas.RotateDegrees(scene.Rotation);
        switch (scene.Shape)
        {
            case DemoShape.Circle:
                canvas.DrawCircle(0, 0, r * 0.92f, paint);
                break;
            case DemoShape.Square:
                float h = r * 0.8f;
                canvas.DrawRect(-h, -h, 2 * h, 2 * h, paint);
                break;
            case DemoShape.Triangle:
                canvas.DrawPath(Polygon(3, r, r, -90), paint);
                break;
            case DemoShape.Star:
                canvas.DrawPath(Star(5, r, r * 0.42f), paint);
                break;
        }
        canvas.Restore();
        canvas.Flush();
        return bmp;
    }

    static SKPath Polygon(int n, float rx, float ry, float startDeg)
    {
        var path = new SKPath();
        for (int i = 0; i < n; i++)
        {
            double a = (startDeg + 360.0 * i / n) * Math.PI / 180;
            var p = new SKPoint((float)(rx * Math.Cos(a)), (float)(ry * Math.Sin(a)));
            if (i == 0) path.MoveTo(p); else path.LineTo(p);
        }
        path.Close();
        return path;
    }

    static SKPath Star(int points, float outer, float inner)
    {
        var path = new SKPath();
        for (int i = 0; i < 2 * points; i++)
        {
            double a = (-90 + 180.0 * i / points) * Math.PI / 180;
            float rr = i % 2 == 0 ? outer : inner;
            var p = new SKPoint((float)(rr * Math.Cos(a)), (float)(rr * Math.Sin(a)));
            if (i == 0) path.MoveTo(p); else path.LineTo(p);
        }
        path.Close();
        return path;
    }

    /// <summary>RGB bytes [H, W, 3] of an opaque RGBA bitmap.</summary>
    public static unsafe byte[] RgbBytes(SKBitmap bmp)
    {
        if (bmp.ColorType != SKColorType.Rgba8888) throw new ArgumentException("expected an RGBA8888 bitmap", nameof(bmp));
        var rgb = new byte[bmp.Width * bmp.Height * 3];
        byte* src = (byte*)bmp.GetPixels();
        for (int y = 0; y < bmp.Height; y++)
        {
            byte* row = src + (long)y * bmp.RowBytes;
            for (int x = 0; x < bmp.Width; x++)
            {
                int o = (y * bmp.Width + x) * 3;
                rgb[o] = row[4 * x];
                rgb[o + 1] = row[4 * x + 1];
                rgb[o + 2] = row[4 * x + 2];
            }
        }
        return rgb;
    }

    /// <summary>
    /// <paramref name="count"/> scenes drawn from <paramref name="seed"/> as a byte tensor [N, 3, size, size] (0..255, CPU)
    /// with their captions. Deterministic for a seed.
    /// </summary>
    public static (Tensor Pixels, IReadOnlyList<ShapeScene> Scenes) Batch(int count, int size, int seed, IReadOnlyList<DemoShape> shapes)
    {
        var rng = new Random(seed);
        var all = new byte[(long)count * size * size * 3];
        var scenes = new List<ShapeScene>(count);
        for (int i = 0; i < count; i++)
        {
            var scene = Random(rng, shapes);
            scenes.Add(scene);
            using var bmp = Render(scene, size);
            RgbBytes(bmp).CopyTo(all, (long)i * size * size * 3);
        }
        using var scope = NewDisposeScope();
        var t = tensor(all, ScalarType.Byte).reshape(count, size, size, 3).permute(0, 3, 1, 2).contiguous();
        return (t.MoveToOuterDisposeScope(), scenes);
    }

    /// <summary>Bytes 0..255 → float32 in [−1, 1].</summary>
    public static Tensor ToUnit(Tensor bytes) => bytes.to_type(ScalarType.Float32) / 127.5 - 1.0;

    /// <summary>
    /// Writes a kohya training folder: <c>root/&lt;repeats&gt;_&lt;folderTokens&gt;/NNNN.png</c> + <c>NNNN.txt</c> captions with
    /// <paramref name="shapeWords"/> in place of the shape name. Returns the concept folder.
    /// </summary>
    public static string WriteKohyaFolder(string root, int repeats, string folderTokens, string shapeWords, DemoShape shape, int count, int size, int seed, string? position = null)
    {
        var folder = Path.Combine(root, $"{repeats.ToString(CultureInfo.InvariantCulture)}_{folderTokens}");
        Directory.CreateDirectory(folder);
        var rng = new Random(seed);
        for (int i = 0; i < count; i++)
        {
            var scene = Random(rng, shape, position);
            using var bmp = Render(scene, size);
            var name = Path.Combine(folder, i.ToString("0000", CultureInfo.InvariantCulture));
            Imaging.PngImage.Save(bmp, name + ".png");
            File.WriteAllText(name + ".txt", scene.Caption(shapeWords) + "\n");
        }
        return folder;
    }
}
